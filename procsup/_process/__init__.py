"""Local processes: how a task process is started, what runs in it, who outlives its supervisor.

Owns: the typed messages between supervisor, zygote and child (``messages``); the zygote's client
(``zygote``) and server with its spare (``server``); which task modules the zygote may import
itself (``trials``); the fork start method's shim (``shim``); the
spawn start method's fresh interpreter (``spawned``); the child's entry point (``entry``) and its
setup (``setup``: limits, log forwarding, captured output); the task's stderr tap (``stdio``)
and log records (``logs``); the guardian that kills a dead supervisor's tasks (``guardian``); an
executor's worker loop (``worker``) and the wire its items travel on (``items``: calls pickled by
reference, or by value with cloudpickle).

May import: ``procsup._os``, ``procsup._token``, ``procsup._outcome``.
"""
