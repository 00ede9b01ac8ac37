"""The demo's critical tasks: each does something visible, and cleans up when its token fires.

They live here, not in ``__main__``, so that spawn and forkserver children import them by module
path, the fast way to start (code in ``__main__`` would travel by value). Each one names its
process (``demo:cpu`` ...) so ``ps``/``top`` and the demo's live view can tell them apart, never
prints (the demo's terminal and ``--json`` stream belong to the parent), and returns its cleanup
message: the return value is how a graceful shutdown reports.

The story's handshakes: a schedule ("segfaults after 5 s") puts the events in the story's order on
an idle machine only. So a task whose act ends the story takes a ``cue`` (a ``Cue``) and, once its
schedule says so, also waits for the demo to say that every earlier act has been told; a task whose
part the demo cannot see from outside takes a ``played`` token and cancels it once played (the
flaky fetcher once connected, the coordinator's sub-task once running). ``procsup.demo.runner``
hands them out. On an idle machine the cue is given before any schedule runs out: the story reads
exactly as its schedules tell it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from typing import Protocol

from procsup import CancellationToken, Supervisor

__all__ = [
    "PROCESS_PREFIX",
    "Counter",
    "Cue",
    "async_heartbeat",
    "cache_builder",
    "config_loader",
    "coordinator",
    "cpu_worker",
    "flaky_fetcher",
    "io_worker",
    "native_parser",
    "plugin_host",
    "shard_reader",
    "stress_task",
]

PROCESS_PREFIX = "demo:"  # every task's process name starts with it (the live view's filter)
_PR_SET_NAME = 15
_CLEANUP_PAUSE = 0.2  # seconds of visible "flushing" so the view shows the cancelling state
CUE_DEADLINE = 60.0  # seconds a final act waits for its cue at most: a safety net, never reached


class Counter(Protocol):
    """A shared integer (``multiprocessing`` ``RawValue("i")``): it outlives a task's runs."""

    value: int


@dataclass(frozen=True)
class Cue:
    """What a task waits for before the act that ends the story: the earlier acts, told.

    ``told`` is cancelled by the demo once every other task has played its part and been shown;
    it is a child of the root token, so Ctrl-C (or any failure) reaches a task waiting on it.
    ``runs`` counts the task's runs (shared across restarts); the first ``free`` of them do not
    wait, so a crash loop keeps its schedule and only the crash that exceeds the restart
    intensity waits.
    """

    told: CancellationToken
    runs: Counter
    free: int = 0

    def wait(self, token: CancellationToken) -> bool:
        """Wait for the cue (unless this run is a free one); True if ``token`` fired meanwhile."""
        self.runs.value += 1  # runs of one task never overlap: no lock needed
        if self.runs.value > self.free:
            self.told.wait(CUE_DEADLINE)
        return token.is_cancelled()


def _name_process(name: str) -> None:
    """Set this process's comm name (Linux ``prctl(PR_SET_NAME)``); best effort elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def cpu_worker(token: CancellationToken) -> str:
    """Hash blocks in a tight loop, checking the token between blocks; checkpoint when cancelled."""
    _name_process(PROCESS_PREFIX + "cpu")
    digest = b"procsup"
    rounds = 0
    while not token.is_cancelled():  # one shared-memory load: cheap enough for a hot loop
        for _ in range(2_000):
            digest = hashlib.sha256(digest).digest()
        rounds += 2_000
    time.sleep(_CLEANUP_PAUSE)
    return f"checkpoint saved after {rounds:,} sha256 rounds (digest {digest.hex()[:12]})"


def io_worker(token: CancellationToken) -> str:
    """Append records to a journal, fsyncing each; flush and close it when cancelled."""
    _name_process(PROCESS_PREFIX + "io")
    records = 0
    # Nameless (O_TMPFILE where available): nothing is left on disk even if the task is killed.
    with tempfile.TemporaryFile("w", prefix="procsup-demo-") as journal:
        while not token.wait(0.05):  # the wait is the I/O worker's idle time, and its exit
            journal.write(f"record {records} at {time.time():.3f}\n")
            journal.flush()
            os.fsync(journal.fileno())
            records += 1
        time.sleep(_CLEANUP_PAUSE)
    return f"journal flushed and closed ({records} records fsynced)"


def shard_reader(
    token: CancellationToken, shards: int, played: CancellationToken | None = None
) -> str:
    """The coordinator's sub-task: reads its shards round-robin until cancelled."""
    _name_process(PROCESS_PREFIX + "subtask")
    if played is not None:  # named: the demo's view can see it now
        played.cancel("the coordinator's sub-task runs")
    reads = 0
    while not token.wait(0.1):
        reads += 1
    time.sleep(_CLEANUP_PAUSE / 2)
    return f"closed {shards} shards after {reads} reads"


def coordinator(
    token: CancellationToken, start_method: str, played: CancellationToken | None = None
) -> str:
    """A nested critical task: runs its own Supervisor and a sub-task under a token it created.

    Cancelling the demo's root reaches the sub-task through this task's token and the child token
    made here; the sub-task's cleanup message comes back inside this task's own. ``played`` is
    handed to the sub-task, which cancels it once it runs.
    """
    _name_process(PROCESS_PREFIX + "nested")
    shards = token.child_token()  # created here, in the task's process
    with Supervisor(start_method=start_method, grace_period=2.0) as sup:
        sub = sup.spawn(
            shard_reader,
            "shard reader",
            args=(3,),
            kwargs={"played": played},
            parent_token=shards,
        )
        token.wait()
        said = sub.join(timeout=10.0)
    return f"sub-task 'shard reader' (pid {sub.pid}) said: {said}"


async def async_heartbeat(token: CancellationToken) -> str:
    """An ``async def`` task: ticks in its own event loop until ``await token.cancelled()``."""
    _name_process(PROCESS_PREFIX + "async")
    beats = 0

    async def beat() -> None:
        nonlocal beats
        while True:
            beats += 1
            await asyncio.sleep(0.1)

    await token.run_until_cancelled(beat())
    return f"event loop closed cleanly after {beats} heartbeats"


def native_parser(token: CancellationToken, crash_after: float, cue: Cue | None = None) -> str:
    """Parse records for ``crash_after`` seconds (and until ``cue``), then dereference NULL in
    native code (SIGSEGV).

    If the token fires first (Ctrl-C), it stops gracefully instead: the crash never happens.
    """
    _name_process(PROCESS_PREFIX + "segv")
    # ~32 MiB of "parsed records", touched (bytes(n) would be lazily zeroed pages, not RSS).
    buffers = [bytes([n]) * (512 * 1024) for n in range(64)]
    if token.wait(crash_after) or (cue is not None and cue.wait(token)):
        return f"stopped before the bad record ({len(buffers)} buffers released)"
    ctypes.string_at(0)  # reads address 0: a real segfault in C, not a Python exception
    return "unreachable"


def cache_builder(token: CancellationToken, chunk: int, every: float) -> str:
    """Cache ``chunk`` bytes every ``every`` seconds, never evicting: a leak, until cancelled.

    Run with a ``memory_limit``, an allocation fails once the limit is reached: the MemoryError
    says how big the cache got (procsup adds which limit it hit). The cache is dropped first, so
    reporting the failure has memory to work with.
    """
    _name_process(PROCESS_PREFIX + "cache")
    cache: list[bytes] = []
    try:
        while not token.wait(every):
            cache.append(bytes([len(cache) % 251]) * chunk)  # written pages: real RSS
    except MemoryError:
        size = len(cache) * chunk
        cache.clear()
        raise MemoryError(f"the cache could not grow past {size / 2**20:.0f} MiB") from None
    return f"dropped its {len(cache) * chunk / 2**20:.0f} MiB cache"


def flaky_fetcher(
    token: CancellationToken,
    attempts: Counter,
    refused: int,
    after: float,
    played: CancellationToken | None = None,
) -> str:
    """Connect to an upstream that refuses the first ``refused`` attempts, then fetch: a flaky task.

    Each run is one attempt (counted in ``attempts``, shared with the demo); a refused attempt
    raises ConnectionRefusedError ``after`` seconds in, which a ``transient`` policy restarts.
    ``played`` is cancelled once connected.
    """
    _name_process(PROCESS_PREFIX + "fetch")
    attempts.value += 1  # runs of one task never overlap: no lock needed
    attempt = attempts.value
    if token.wait(after):
        return f"stopped while connecting (attempt {attempt})"
    if attempt <= refused:
        raise ConnectionRefusedError(
            f"upstream 127.0.0.1:5432 refused attempt {attempt}: the database is still starting"
        )
    if played is not None:
        played.cancel(f"the flaky fetcher connected on attempt {attempt}")
    fetches = 0
    while not token.wait(0.05):
        fetches += 1
    time.sleep(_CLEANUP_PAUSE)
    return f"connected on attempt {attempt}; {fetches} fetches, then disconnected cleanly"


def plugin_host(token: CancellationToken, crash_after: float, cue: Cue | None = None) -> str:
    """Load a broken plugin whose native init aborts ``crash_after`` seconds in (and, on the runs
    ``cue`` does not let go free, once cued), on every run."""
    _name_process(PROCESS_PREFIX + "plugin")
    if token.wait(crash_after) or (cue is not None and cue.wait(token)):
        return "stopped before loading the plugin"
    # No core file per run of a crash loop (the demo's disk is not the point).
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.abort()  # SIGABRT, as a failed C assert() would raise: no Python exception to catch


def _parse_line(line: str, number: int) -> tuple[str, int]:
    key, _, value = line.partition("=")
    try:
        return key.strip(), int(value)
    except ValueError as exc:
        raise ValueError(
            f"line {number}: {key.strip()!r} must be an integer, got {value!r}"
        ) from exc


def config_loader(token: CancellationToken, fail_after: float) -> str:
    """Load settings; after ``fail_after`` seconds hit a bad line and raise (a Python error)."""
    _name_process(PROCESS_PREFIX + "config")
    if token.wait(fail_after):
        return "stopped before reading the config"
    lines = ["workers = 4", "port = 8080", "timeout = 30s"]
    settings = dict(_parse_line(line, number) for number, line in enumerate(lines, 1))
    return f"loaded {len(settings)} settings"


def stress_task(token: CancellationToken, number: int) -> int:
    """A trivial task for the stress scenario: return a value derived from its argument."""
    return number * number
