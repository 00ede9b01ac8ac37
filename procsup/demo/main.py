"""``python -m procsup``: the demo a newcomer runs first (``make demo``).

::

    main(argv) ─ parse ─ make_view() ─ asyncio.run(Runner.run())   (procsup.demo.runner)
                  │                       └─ plan(scenario, start method) ─▶ [Spec]: the tasks
                  └─ --backend ray ─▶ run_on_ray(): the crash scenario on a local two-node Ray
                                      cluster (procsup.demo.ray_demo)

This module is what the scenarios are: which tasks run, with which policies and limits, on which
schedule. Each schedule is chosen so the story reads in one order on any machine: in "crash" the
cache builder hits its memory limit (and is restarted) well before the native parser segfaults and
well before its second run would; in "restart" the flaky fetcher has recovered before the plugin
host's third crash exceeds its restart intensity.

Events reach a view (``procsup.demo.view``, chosen by ``procsup.demo.output.make_view``): a rich
live table on a terminal, timestamped lines otherwise, one JSON object per line with ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import sys
from collections.abc import Sequence

from procsup.demo import tasks
from procsup.demo.output import make_view
from procsup.demo.runner import STRESS_TASKS, STRESS_TASKS_SPAWN, Runner
from procsup.demo.spec import Spec
from procsup.demo.view import JsonView, PlainView, View

__all__ = ["SCENARIOS", "main", "plan"]

CRASH_AFTER = 5.0  # seconds before the native parser segfaults
MEMORY_LIMIT = 96 * 2**20  # the cache builder's memory_limit: hit after about 3 s
LEAK_CHUNK, LEAK_EVERY = 2 * 2**20, 0.08  # 25 MiB/s: a second run would hit it after 6 s
FAIL_AFTER = 2.0  # seconds before the config loader raises
REFUSED, CONNECT_AFTER = 2, 0.4  # the flaky fetcher's refused attempts, seconds into each run
PLUGIN_CRASH_AFTER = 0.8  # seconds into each run before the plugin host aborts
BACKOFF = (0.25, 1.0)  # restart backoff (first, most) in the restart scenario

SCENARIOS = {  # one line each in --help
    "crash": "(default) a cache leaks to its memory limit and is restarted; a worker segfaults "
    "in C after 5 s: root cancelled, all clean up, exit 1",
    "error": "a worker raises ValueError after 2 s: its child traceback, clean shutdown, exit 1",
    "graceful": "nothing fails; after 3 s the demo cancels the root, all clean up, exit 0",
    "restart": "a flaky worker is restarted twice and recovers; a plugin that keeps crashing "
    "exceeds its restart intensity: root cancelled, exit 1",
    "stress": f"{STRESS_TASKS} tiny tasks through one supervisor: tasks/s, latency p50/p99, exit 0",
}


def plan(scenario: str, start_method: str) -> list[Spec]:
    """The tasks of ``scenario``: four well-behaved workers, then the scenario's own."""
    specs = [
        Spec(tasks.cpu_worker, "cpu worker"),
        Spec(tasks.io_worker, "io worker"),
        Spec(tasks.coordinator, "coordinator", (start_method,)),
        Spec(tasks.async_heartbeat, "async heartbeat"),
    ]
    if scenario == "crash":
        leaky = {"restart": "transient", "max_restarts": 3, "period": 30.0}
        specs += [
            Spec(
                tasks.cache_builder,
                "cache builder",
                (LEAK_CHUNK, LEAK_EVERY),
                {**leaky, "memory_limit": MEMORY_LIMIT},
            ),
            Spec(tasks.native_parser, "native parser", (CRASH_AFTER,)),
        ]
    elif scenario == "error":
        specs.append(Spec(tasks.config_loader, "config loader", (FAIL_AFTER,)))
    elif scenario == "restart":
        attempts = multiprocessing.get_context(start_method).RawValue("i", 0)
        intensity = {"max_restarts": 2, "period": 10.0, "backoff": BACKOFF}
        specs += [
            Spec(
                tasks.flaky_fetcher,
                "flaky fetcher",
                (attempts, REFUSED, CONNECT_AFTER),
                {**intensity, "restart": "transient", "max_restarts": 3},
            ),
            Spec(
                tasks.plugin_host,
                "plugin host",
                (PLUGIN_CRASH_AFTER,),
                {**intensity, "restart": "permanent"},
            ),
        ]
    return specs


def _parser() -> argparse.ArgumentParser:
    scenarios = "\n".join(f"  {name:<9} {text}" for name, text in SCENARIOS.items())
    parser = argparse.ArgumentParser(
        prog="python -m procsup",
        description="procsup demo: critical tasks in child processes, supervised. A task that "
        "fails or crashes cancels its parent token (a restartable one, once restarts no longer "
        "help), and everything shuts down cleanly. The workers: a CPU worker, an I/O worker, a "
        "coordinator running its own sub-task (a nested critical task), an async def heartbeat, "
        "and the scenario's own.",
        epilog=f"scenarios:\n{scenarios}\n\nCtrl-C cancels the root token: every task cleans "
        "up and the demo exits 130 (a second Ctrl-C stops them at once).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scenario", choices=list(SCENARIOS), default="crash", help="what to run (default: crash)"
    )
    parser.add_argument(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        default=None,
        help="multiprocessing start method for the tasks "
        "(default: procsup's, forkserver where available)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per line (the events, in order)"
    )
    parser.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="where the tasks run: this machine (default), or a local two-node Ray cluster "
        "started for the demo (the crash scenario; needs the ray extra: procsup[ray])",
    )
    parser.add_argument(
        "--tasks",
        type=int,
        default=None,
        metavar="N",
        help=f"stress: how many tasks (default: {STRESS_TASKS}, or {STRESS_TASKS_SPAWN} under "
        "spawn, where each start costs a fresh interpreter)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=8,
        metavar="N",
        help="stress: tasks in flight at once (default: 8)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return the process exit code.

    Args:
        argv: Command-line arguments without the program name; None means ``sys.argv[1:]``.

    Returns:
        0 when every task shut down gracefully, 1 when a task failed or crashed for good (or had
        to be stopped), 130 after Ctrl-C.
    """
    args = _parser().parse_args(argv)
    if (args.tasks is not None and args.tasks < 1) or args.concurrency < 1:
        _parser().error("--tasks and --concurrency must be at least 1")
    # The demo reports every outcome itself; without a handler, logging's last resort would
    # print the supervisor's records (restarts, failures) to stderr in the middle of the view.
    logging.getLogger("procsup").addHandler(logging.NullHandler())
    if args.backend == "ray":
        if args.scenario != "crash" or args.start_method is not None:
            _parser().error("--backend ray runs the crash scenario, with procsup's start method")
        return _on_ray(args.json)
    view = make_view(args.json)
    try:
        return asyncio.run(Runner(view, args, plan).run())
    finally:
        view.close()


def _on_ray(as_json: bool) -> int:
    """The crash scenario on a local two-node Ray cluster (``procsup.demo.ray_demo``)."""
    from procsup.demo.ray_demo import run_on_ray  # Ray is an optional extra: imported on demand

    view: View = JsonView(sys.stdout) if as_json else PlainView(sys.stdout)
    try:
        return run_on_ray(view, CRASH_AFTER)
    finally:
        view.close()
