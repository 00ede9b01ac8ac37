"""The bottom layer: what Linux and the interpreter give, wrapped once for the layers above.

Owns: fds and fd passing (``fds``), ``/proc``, prctl and signal facts (``proc``), forking with
CPython's fork handling only where a child needs it (``forking``), killing and reaping a process
tree, and the one escalation ladder every stop follows (``tree``), and the one meaning of a
timeout (``timeouts``).

May import: the standard library and psutil. Nothing of procsup.
"""
