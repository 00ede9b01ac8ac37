"""``python -m procsup``: the demo a newcomer runs first (``make demo``), on the public API only.

Modules, each importing only modules listed below it:

- ``main``: the command line and the scenarios: which tasks run, with which policies and limits.
- ``runner``: one run of a scenario: starts the tasks, follows them, tells the story in order.
- ``ray_demo``: the crash scenario on a local two-node Ray cluster (``--backend ray``).
- ``output``: ``make_view``: JSON lines, the rich live table on a terminal, or plain lines. Its
  import of ``rich_view`` is the one inside a function, because rich is an optional extra.
- ``runs``: each run as ``Supervisor.events()`` tells it: failures, restarts, escalation.
- ``stress``: the stress scenario: many short tasks, their throughput and latency percentiles.
- ``rich_view``: the live table on a terminal; the only module that imports rich.
- ``view``: the ``View`` interface, and the plain-lines and JSON views.
- ``rows``: one ``Row`` per task across its runs, sampled from ``Supervisor.tasks()`` and psutil.
- ``spec``: what a scenario is made of: one ``Spec`` per task.
- ``tasks``: the critical tasks themselves, which run in the task processes.

May import: ``procsup`` and ``procsup.ray`` only (the public names, nothing private), the
standard library, psutil, in ``rich_view`` only rich (the optional ``demo`` extra), and in
``ray_demo`` only Ray (the optional ``ray`` extra). The library never imports the demo.
"""
