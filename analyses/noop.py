"""The ``noop`` analysis: a configurable loop for tests, benchmarks and first runs.

Besides sleeping or spinning for a number of steps it can inject every fault
the service must survive: failures, ignored cancels, abrupt exits, signals,
memory use and child processes. Every step reports progress and checks for
cancel, unless ``ignore_cancel`` is set.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

from analyses import registry
from analyses.errors import AnalysisError, InvalidParams, RetryableError

_SIGNALS = ("SIGKILL", "SIGTERM", "SIGSEGV", "SIGABRT", "SIGINT")

# Parameters that run a shell command, write a file or end the worker
# process. Anyone who may submit a job could otherwise run code on the
# supervisor's host, so a supervisor honours them only when its environment
# sets this variable to 1, as test suites and benchmarks do.
FAULT_INJECTION_VARIABLE = "ANALYSIS_ALLOW_FAULT_INJECTION"
_FAULT_PARAMS = ("spawn_child", "run_log", "exit_code", "kill_signal")


def _append_run_log(path: str, context, event: str) -> None:
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"{context.job_id} {context.attempt} {os.getpid()} {event}\n")


def _busy_wait(seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


def _grow(ballast: list[bytearray], mib: int) -> list[bytearray]:
    """Return ``ballast`` with ``mib`` MiB more, every page touched so it is resident, not just reserved."""
    block = bytearray(mib * 1024 * 1024)
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    return [*ballast, block]


def run_noop(params: dict[str, Any], context) -> Any:
    if os.environ.get(FAULT_INJECTION_VARIABLE) != "1":
        for name in _FAULT_PARAMS:
            if params.get(name) is not None:
                raise InvalidParams(name, params[name], f"fault injection is disabled on this supervisor; "
                                                        f"start it with {FAULT_INJECTION_VARIABLE}=1 to allow it")
    run_log = params.get("run_log")
    if run_log:
        _append_run_log(run_log, context, "start")

    child = None
    if params.get("spawn_child"):
        # A new session makes the child a process group leader; the worker
        # records that group so termination reaches the shell's children too.
        child = subprocess.Popen(params["spawn_child"], shell=True, start_new_session=True)
        context.register_process_group(child.pid)

    if params["ignore_sigterm"]:
        # Like a body stuck where SIGTERM has no effect: only SIGKILL ends it.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    ballast: list[bytearray] = []
    if params.get("alloc_mib"):
        ballast = _grow(ballast, params["alloc_mib"])

    steps = params["steps"]
    context.phase("steps", total=steps)
    for step in range(steps):
        if not params["ignore_cancel"]:
            context.check_cancelled()
        if params.get("fail_at") is not None and step == params["fail_at"]:
            if params["fail_kind"] == "retryable":
                raise RetryableError(f"injected retryable failure at step {step}")
            raise AnalysisError(f"injected failure at step {step}", {"step": step})
        if params.get("exit_code") is not None and step == params.get("exit_at", 0):
            os._exit(params["exit_code"])
        if params.get("kill_signal") and step == params.get("exit_at", 0):
            os.kill(os.getpid(), getattr(signal, params["kill_signal"]))
            time.sleep(5)
        if params.get("alloc_step_mib"):
            ballast = _grow(ballast, params["alloc_step_mib"])
        if params["cpu"]:
            _busy_wait(params["step_seconds"])
        elif params["step_seconds"]:
            time.sleep(params["step_seconds"])
        context.progress(step + 1)

    if child is not None:
        child.wait()
    del ballast
    if run_log:
        _append_run_log(run_log, context, "end")
    summary = params["result"] if "result" in params else {"steps": steps}
    if params.get("non_finite_result"):
        # JSON parameters cannot carry NaN or Infinity, so this flag is how a
        # test makes a body return them.
        summary = {**summary, "non_finite": [float("nan"), float("inf"), float("-inf")]}
    return summary


NOOP = registry.register(
    registry.Analysis(
        name="noop",
        summary="Sleep or spin for a number of steps; injects faults for testing.",
        body=run_noop,
        params=(
            registry.Param("steps", "integer", "number of loop steps", default=10, minimum=0, maximum=10_000_000),
            registry.Param("step_seconds", "number", "sleep (or spin, with cpu) per step, in seconds",
                           default=0.0, minimum=0, maximum=3600),
            registry.Param("cpu", "boolean", "spin on the CPU instead of sleeping", default=False),
            registry.Param("fail_at", "integer", "step at which to raise an error", minimum=0),
            registry.Param("fail_kind", "string", "kind of injected failure", default="final",
                           choices=("retryable", "final")),
            registry.Param("ignore_cancel", "boolean", "never check for cancel", default=False),
            registry.Param("ignore_sigterm", "boolean",
                           "ignore SIGTERM until the worker starts its next job, so only SIGKILL stops it",
                           default=False),
            registry.Param("spawn_child", "string", "shell command started in its own process group",
                           max_length=1000),
            registry.Param("exit_code", "integer", "leave with os._exit(exit_code) at step exit_at",
                           minimum=0, maximum=255),
            registry.Param("kill_signal", "string", "kill the worker with this signal at step exit_at",
                           choices=_SIGNALS),
            registry.Param("exit_at", "integer", "step for exit_code and kill_signal", default=0, minimum=0),
            registry.Param("alloc_mib", "integer", "hold this much memory while running, in MiB",
                           minimum=0, maximum=65536),
            registry.Param("alloc_step_mib", "integer", "hold this much more memory after each step, in MiB",
                           minimum=0, maximum=4096),
            registry.Param("result", "json", "summary returned as given"),
            registry.Param("non_finite_result", "boolean",
                           "add NaN, Infinity and -Infinity to the summary (test hook)", default=False),
            registry.Param("run_log", "string", "file that gets a line at each start and end of the body",
                           max_length=4096),
        ),
        max_attempts=3,
    )
)
