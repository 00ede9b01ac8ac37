"""Supervision: everything between the public API and "where processes run".

Owns: the runtime seam (``runtime``: the protocol a backend implements); the local backend
(``local``: launching runs of this machine's processes and the supervision thread that watches
them, ``monitor``); a task across its runs (``lifecycle``: restart policies, timeouts); status and
events (``status``); signals (``signals``); the ``Supervisor`` and the handle.

May import: every layer below (``procsup._process``, ``procsup._outcome``, ``procsup._token``,
``procsup._os``). Only ``supervisor`` and ``local`` may touch ``procsup._process``: the rest
reaches processes through the runtime protocol, so another backend (Ray) reuses it unchanged.
"""
