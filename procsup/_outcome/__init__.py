"""What a run ended with: the error family, outcomes sent back by a child, crash records.

Owns: the public exceptions (``errors``, every class pinned to ``procsup`` so pickles name the
public path), the child's outcome frame and the rebuilt child traceback (``remote``, tblib), and
the text and attributes of a ``TaskCrashedError`` (``crash``).

May import: ``procsup._os``. Nothing about how processes are started or supervised.
"""
