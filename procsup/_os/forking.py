"""fork(), with CPython's own fork handling only where a child needs it.

::

    zygote (one thread)                             a fork task's shim (one thread, most often)
    ───────────────────                             ───────────────────────────────────────────
    its first line, before any import, wraps        made by os.fork(): CPython's fork handling,
      os.register_at_fork: each hook registered       every at-fork hook, have just run in it
      from then on is also kept (RECORDER)          fork_copy(): the task is its copy
    Hooks(kept, early).fork():                        one thread? the C library's fork(), and
      one thread, every hook known? else os.fork()      no fork handling: there is nothing the
      the before hooks that matter                      shim has not just reset
      fork()  (the C library's; the GIL held)         else os.fork()
      child: the after_in_child hooks that matter
      parent: the after_in_parent hooks that matter

"That matter": all but those of threading, logging and concurrent.futures.thread, which repair
locks and thread records that only another thread of the parent could have left behind.

Things that don't work
----------------------
- ``os.fork()`` in the zygote: a child of a process that imported procsup spent ~620 us of CPU and
  ~300 page faults in CPython's fork handling before it ran a line (threading's at-fork hook alone
  ~250 us), against ~120 us and ~50 faults after the C library's ``fork()`` (medians of 300,
  this 2-core VM). The zygote has one thread, so there is nothing for those hooks to repair.
- Replaying hooks nobody saw registered: a hook registered before the wrapper (by a ``.pth`` file
  or ``sitecustomize``) is unknown. ``Hooks`` knows what the standard library registers; if any
  other module was imported before the wrapper (setuptools' own ``.pth`` helpers aside), every
  fork is ``os.fork()``.
- The C library's fork in a process with other threads, then ``PyOS_AfterFork_Child()`` through
  ctypes (the C API documented for forks made by other means): the call back into Python runs
  bytecode first, and if another thread had asked for the GIL, that bytecode drops it and waits
  for a thread the child does not have, forever. Only one-thread processes fork this way.
- ``ctypes.CDLL``'s ``fork``: ctypes lets go of the GIL around a foreign call; ``ctypes.PyDLL``
  keeps it, so the child is born holding it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import traceback
from collections.abc import Callable, Collection, Sequence
from typing import Any

__all__ = ["RECORDER", "Hook", "Hooks", "fork_copy", "thread_repair"]

Hook = dict[str, Callable[[], object]]
_Plan = tuple[tuple[Callable[[], object], ...], ...]  # before, after_in_child, after_in_parent

# What the zygote runs first (``python -c``), before anything imports procsup: ``hooks`` gets
# every hook registered from then on, ``early`` names what was imported before.
RECORDER = (
    "import os, sys; early = tuple(sys.modules); hooks = []; register = os.register_at_fork; "
    "os.register_at_fork = lambda **kw: (register(**kw), hooks.append(kw))[0]; "
)

# Hooks marked with ``thread_repair()``: skipped, as threading's are, in a one-thread parent.
_THREAD_REPAIRS: set[Any] = set()

# Set in a .pth file by setuptools (its editable finders, its distutils shim): no at-fork hooks.
_PTH_HELPERS = ("_distutils_hack", "__editable__")


@functools.cache
def _c() -> Any:
    return ctypes.PyDLL(None, use_errno=True)  # the GIL stays held: see "Things that don't work"


def _fork() -> int:
    """fork(2) through the C library (the GIL held): the pid, 0 in the child, or -errno."""
    pid: int = _c().fork()
    return -(ctypes.get_errno() or 1) if pid < 0 else pid


def _threads() -> int:
    """Threads of this process (a ``/proc/self/task`` directory links each, plus 2)."""
    try:
        return os.stat("/proc/self/task").st_nlink - 2
    except OSError:
        return 0  # unknown: never taken for one


def _call(hook: Callable[[], object]) -> None:
    try:
        hook()
    except BaseException:  # noqa: BLE001 - as CPython does: reported, and the fork goes on
        print(f"Exception ignored in at-fork hook {hook!r}:", file=sys.stderr)
        traceback.print_exc()


def thread_repair(hook: Callable[[], object]) -> Callable[[], object]:
    """Mark ``hook``, an ``after_in_child`` hook that only re-creates locks, as one ``Hooks.fork``
    skips, as it skips threading's: the one thread of a process that forks that way (the
    zygote, from its main loop) holds no such lock when it forks. ``os.fork()`` still runs it.
    Returns ``hook``, to be registered as usual.

    A skipped hook is pages a child does not write: procsup's lock resets cost every task of a
    zygote ~40 page faults (copies of pages it shares with the zygote) on this 2-core VM.
    """
    _THREAD_REPAIRS.add(hook)
    return hook


def _repairs() -> set[Any]:
    """The hooks that only repair what another thread left behind: the standard library's
    (3.11: threading's, logging's and concurrent.futures.thread's, as registered) and those
    marked with ``thread_repair()``."""
    found: set[Any] = set(_THREAD_REPAIRS)
    threading = sys.modules.get("threading")
    if threading is not None:
        found.add(getattr(threading, "_after_fork", None))
    logging = sys.modules.get("logging")
    if logging is not None:
        for name in ("_acquireLock", "_releaseLock", "_after_at_fork_child_reinit_locks"):
            found.add(getattr(logging, name, None))
    pool = sys.modules.get("concurrent.futures.thread")
    lock = getattr(pool, "_global_shutdown_lock", None)
    if lock is not None:
        found.update((lock.acquire, lock.release, lock._at_fork_reinit))
    found.discard(None)
    return found


class Hooks:
    """The at-fork hooks of a process whose ``os.register_at_fork`` was wrapped (``RECORDER``).

    Invariants: ``_kept`` is the wrapper's list, in registration order (it grows as modules are
    imported); ``_known`` is False if a module imported before the wrapper may have registered a
    hook nobody saw; ``_reseed`` is True if ``random`` was one of them (its hook reseeds).
    """

    def __init__(self, kept: Sequence[Hook], early: Collection[str]) -> None:
        self._kept = kept
        stdlib = sys.stdlib_module_names
        self._known = all(
            name.split(".")[0] in stdlib or name == "__main__" or name.startswith(_PTH_HELPERS)
            for name in early
        )
        self._reseed = "random" in early
        self._plan: tuple[int, int, _Plan] | None = None  # (hooks, modules) it was made for

    @property
    def fast(self) -> bool:
        """True if ``fork()`` would skip CPython's fork handling now."""
        return self._known and _threads() == 1

    def fork(self) -> int:
        """Fork as ``os.fork()`` does, or, in a process of one thread whose hooks are all known,
        through the C library, running the hooks that matter. OSError as ``os.fork()``."""
        if not self.fast:
            return os.fork()
        sys.audit("os.fork")
        before, in_child, in_parent = self._hooks()
        for hook in before:
            _call(hook)
        pid = _fork()
        if pid == 0:
            for hook in in_child:
                _call(hook)
            return 0
        for hook in in_parent:
            _call(hook)
        if pid < 0:
            raise OSError(-pid, os.strerror(-pid))
        return pid

    def _hooks(self) -> _Plan:
        """The hooks to run, in order, made again only once a hook or a module is added (an
        import may add a repair): walking the hook dicts at every fork wrote to each (their
        reference counts) after the last fork had shared it with a child, a copied page each."""
        key = (len(self._kept), len(sys.modules))
        if self._plan is None or self._plan[:2] != key:
            repairs = _repairs()

            def pick(when: str, hooks: Sequence[Hook]) -> tuple[Callable[[], object], ...]:
                found = (hook.get(when) for hook in hooks)
                return tuple(fn for fn in found if fn is not None and fn not in repairs)

            in_child = pick("after_in_child", self._kept)
            if self._reseed:
                in_child += (_reseed_random,)
            plan = (pick("before", self._kept[::-1]), in_child, pick("after_in_parent", self._kept))
            self._plan = (key[0], key[1], plan)
        return self._plan[2]


def _reseed_random() -> None:
    random = sys.modules.get("random")
    if random is not None:
        random._inst.seed()


def fork_copy() -> int:
    """Fork a process that has just been through CPython's fork handling (a fork task's shim):
    with one thread, through the C library, as its child needs none of its own; else
    ``os.fork()``. OSError as ``os.fork()``."""
    if _threads() != 1:
        return os.fork()
    sys.audit("os.fork")
    pid = _fork()
    if pid < 0:
        raise OSError(-pid, os.strerror(-pid))
    return pid
