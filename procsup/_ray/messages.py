"""What crosses between the driver, the token hub and the agents: frozen, plain data.

::

    driver (procsup._ray.backend)         agent on a node (procsup._ray.agent)
    ─────────────────────────────         ────────────────────────────────────
    agent.ready()  ───────────────────▶  ◀─ Ready: which node, which process, where its door is
    agent.start(pickled StartRequest) ▶  ◀─ pickled Started(pid, outcome) | Refused(kind, message)
    the same bytes on the door ───────▶  ◀─ the same bytes (procsup._ray.channel)
    agent.outcomes(acked) ────────────▶  ◀─ [(seq, run id, Outcome) | (seq, stop id, StopDone)]:
                                            what ended since ``acked`` (a long poll)
    agent.stop(StopRequest) ──────────▶  ◀─ True: the cancel is done, the ladder runs there;
                                            its StopDone comes on the outcomes poll
    agent.discard(run id) ────────────▶     a start the driver gave up on
    agent.facts([run id, ...]) ───────▶  ◀─ [(pid, rss, cpu_percent), ...]
    agent.counts() ───────────────────▶  ◀─ {"direct": n, "ray": n, "repeated": n}: starts

    token hub (procsup._ray.hub): Cancellation = (run id, cause), relayed down to the agent
    of the run (the driver cancelled its token) or up to the driver (the task cancelled it).

A start crosses as bytes both ways (by the agent's door, or by Ray), pickled by procsup
(``pickle``: Ray's own serialization of a dataclass costs a start about 0.15 ms more, there and
back). The task's call inside it,
``StartRequest.call``, is pickled with cloudpickle, as Ray would: by reference what can be
imported by name, by value the rest (lambdas, closures, the driver's ``__main__``). The rest
travels with Ray's serialization.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from procsup._outcome.errors import CriticalTaskError

__all__ = [
    "Cancellation",
    "NodeInfo",
    "Outcome",
    "Ready",
    "Refused",
    "StartRequest",
    "Started",
    "StopDone",
    "StopRequest",
]

Cancellation = tuple[str, str]  # (run id, cause): one token cancelled, relayed by the hub


@dataclass(frozen=True)
class NodeInfo:
    """Where an agent runs.

    Attributes:
        node_id: The Ray node id, in hex.
        ip: The node's IP address, as Ray knows it.
        hostname: The node's host name.
        agent_pid: The agent's process id on that node.
    """

    node_id: str
    ip: str
    hostname: str
    agent_pid: int

    def __str__(self) -> str:
        return f"{self.node_id} ({self.ip})"


@dataclass(frozen=True)
class Ready:
    """The agent is up: ``ready()``'s answer.

    Attributes:
        info: Where it runs.
        door: The ``(host, port)`` where it takes starts directly (``procsup._ray.channel``), or
            None if it could not listen: every start then goes by Ray.
        authkey: The door's key, which only this answer carries (left out of the repr).
    """

    info: NodeInfo
    door: tuple[str, int] | None
    authkey: bytes = field(repr=False)


@dataclass(frozen=True)
class StartRequest:
    """One run to start on a node: ``task_fn(token, *args, **kwargs)`` under the agent.

    Attributes:
        run_id: Names the run in every later message (made by the driver).
        description: The task's, as ``RunSpec`` has it.
        call: ``(task_fn, args, kwargs)``, pickled with cloudpickle.
        by_value: True when a plain pickle of the call would not do (a lambda, a closure, the
            driver's ``__main__``): the task process opens ``call`` itself
            (``procsup._ray.entry.call_pickled``) instead of being started by reference.
        key: Names the task function, for the agent's memory of how long its runs take.
        memory_limit, cpu_time_limit, capture_output: Applied on the node, as locally.
        cause: None, or the cause of the run's token, which the driver found cancelled already:
            the run starts with its token cancelled (seed C3/C4).
    """

    run_id: str
    description: str
    call: bytes
    by_value: bool
    key: str
    memory_limit: int | None
    cpu_time_limit: float | None
    capture_output: bool
    cause: str | None


@dataclass(frozen=True)
class Started:
    """The run's process exists and the node's supervision thread watches it.

    Attributes:
        pid: The process id on the node.
        outcome: The run's outcome if it ended while the agent waited before answering (a task
            that ended quickly on this node the last time), else None: it rides the outcomes
            poll.
    """

    pid: int
    outcome: Outcome | None = None


@dataclass(frozen=True)
class StopDone:
    """A stop's ladder is done on the node: what outlived SIGKILL there (usually nothing)."""

    stuck: tuple[str, ...]


@dataclass(frozen=True)
class Refused:
    """No process was started: ``kind`` names the exception the driver raises, with ``message``
    ("TypeError": the task cannot travel or be pickled there; "ImportError": a preload module is
    broken there; "RuntimeError": the agent is shutting down or lost its driver)."""

    kind: str
    message: str


@dataclass(frozen=True)
class StopRequest:
    """Stop runs of one agent on procsup's ladder there (``procsup._os.tree.Ladder``).

    Attributes:
        stop_id: Names this stop's ``StopDone`` on the outcomes poll.
        run_ids: The runs; those already ended are skipped.
        grace, cancel_reason, stop_reason, failure: As for ``Backend.stop()``.
    """

    stop_id: str
    run_ids: tuple[str, ...]
    grace: float | None
    cancel_reason: str
    stop_reason: str
    failure: bool


@dataclass(frozen=True)
class Outcome:
    """How a run ended, from the node's supervision thread (``procsup._ray.outcome``).

    Exactly one of ``value`` and ``error`` is set.

    Attributes:
        exitcode: The process's exit code once reaped (``-N`` for signal N).
        value: The return value as a result frame (``procsup._outcome.remote.encode_return``).
        error: The run's error, as the node classified it (its crash record included).
        cause: The error's ``__cause__`` as an error frame, tracebacks and chain included: plain
            pickling drops both (``procsup._outcome.errors``).
        cancelled: The cause of the run's token if the task cancelled it itself, else None: the
            driver's copy is cancelled with it before the outcome is published, even when the
            relay had no time to carry it.
    """

    exitcode: int | None
    value: bytes | None
    error: CriticalTaskError | None
    cause: bytes | None
    cancelled: str | None = None
