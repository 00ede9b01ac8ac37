"""Ray: the runtime seam's second backend, where runs are processes on the nodes of a Ray cluster.

Owns, each module importing only those listed below it (import-linter checks it):

- ``backend``: the driver's side, the ``Backend`` of ``procsup._supervision.runtime`` over the
  agents: placing and starting runs, outcomes, relaying tokens, stops, a lost agent or node.
- ``agent``: the agent, one Ray actor per node, which starts and stops runs there with procsup's
  local backend, relays its tasks' tokens, and stops everything when its driver is gone.
- ``hub``: the token hub, a Ray actor for the driver's lifetime relaying cancellations both ways.
- ``outcome``: a run's outcome on its way from a node to the driver; the errors of a lost node.
- ``entry``: what a task process calls when its task had to travel by value.
- ``placement``: which node a run starts on. ``options``: ``spawn()``'s Ray options.
- ``threads``: the driver's loop thread and timer thread.
- ``records``: the driver's record of each agent and each run (a ``runtime.Run``).
- ``messages``: what crosses between the driver, the hub and the agents.

The public ``procsup.ray`` (``RaySupervisor``) sits on top.

May import: every layer below (``procsup._supervision``, ``procsup._process``,
``procsup._outcome``, ``procsup._token``, ``procsup._os``) and Ray. ``import procsup`` never
imports this package: Ray is an optional extra (``procsup[ray]``).
"""
