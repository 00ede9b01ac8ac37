"""The executor: ``procsup.Executor``, many short items on a pool of supervised workers.

Owns: the public ``Executor`` and the one place it names the local backend (``executor``); the
engine, one thread that hands items to workers and publishes their outcomes (``pool``); items and
workers as that thread sees them (``workers``); what an item's future raises (``outcomes``); the
future whose ``cancel()`` also stops a running item (``future``).

May import: every layer below (``procsup._supervision``, ``procsup._process``,
``procsup._outcome``, ``procsup._token``, ``procsup._os``). Only ``executor`` may touch the local
backend; the rest reaches processes through the runtime protocol (``procsup._supervision.runtime``)
and runs ``procsup._process.worker`` in them.
"""
