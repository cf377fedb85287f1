"""Pause new claims while the machine is under CPU or memory pressure.

Claims pause when the CPU load of *other* programs stays above
``pause_cpu_percent``, or when memory pressure is high, and resume only once
load falls below the lower ``resume_cpu_percent`` (hysteresis, so a load
hovering at one threshold does not flap). The service's own workers are
subtracted from the CPU figure: a full pool must never pause itself.
Running jobs are never paused, and a paused supervisor starts nothing new,
even with every slot free: on the Mac mini the controller comes first. It
records its state, reason, readings and the time the pause began in its
supervisors row, so it is never silently stalled.

Readings come through ``Reader`` so tests can inject them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

# The Mac mini also runs the controller: leave it headroom, and let work in
# again only well below the pause level.
PAUSE_CPU_PERCENT_DEFAULT = 85.0
RESUME_CPU_PERCENT_DEFAULT = 65.0
# Linux PSI "some avg10": the share of the last 10 s in which at least one
# task waited for memory.
PAUSE_MEMORY_PSI_DEFAULT = 20.0
RESUME_MEMORY_PSI_DEFAULT = 5.0
MIN_SAMPLE_SECONDS = 1.0
# Used where neither PSI nor a macOS pressure level is available.
PAUSE_AVAILABLE_RATIO_DEFAULT = 0.05
RESUME_AVAILABLE_RATIO_DEFAULT = 0.10
# Swapping out this fast means memory is short, whatever the other signals
# report, so a macOS "warning" level or a low available ratio with this rate
# counts as critical. The value is an estimate: an idle system pages out far
# less than a sustained 10 MiB/s.
SWAP_OUT_CRITICAL_BYTES_PER_SECOND = 10 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Readings:
    # CPU use of everything but this service's workers, in percent of all CPUs.
    other_cpu_percent: float
    # "normal", "warning" or "critical"
    memory_level: str
    memory_detail: dict


class Reader:
    """Reads system CPU and memory pressure with psutil and the OS's own signals.

    One long-lived reader is used because psutil's first ``cpu_percent()``
    call has no previous sample and returns a meaningless 0.0; the
    constructor takes that first sample.
    """

    def __init__(self, worker_pids: Callable[[], Iterable[int]]):
        self._worker_pids = worker_pids
        self._processes: dict[int, psutil.Process] = {}
        psutil.cpu_percent(interval=None)
        self._sampled_at = time.monotonic()
        self._psi = Path("/proc/pressure/memory")
        self._swapped_out = self._swap_out_bytes()
        self._swap_rate = 0.0

    @staticmethod
    def _swap_out_bytes() -> int | None:
        try:
            return psutil.swap_memory().sout
        except (OSError, RuntimeError):
            return None

    def _update_swap_rate(self, seconds: float) -> None:
        swapped_out = self._swap_out_bytes()
        if swapped_out is not None and self._swapped_out is not None and seconds > 0:
            self._swap_rate = max(0.0, (swapped_out - self._swapped_out) / seconds)
        self._swapped_out = swapped_out

    def _with_swap(self, level: str, detail: dict) -> tuple[str, dict]:
        detail["swap_out_mib_per_second"] = round(self._swap_rate / (1024 * 1024), 2)
        if level == "warning" and self._swap_rate >= SWAP_OUT_CRITICAL_BYTES_PER_SECOND:
            level = "critical"
        return level, detail

    def _own_cpu_percent(self) -> float:
        # The supervisor itself counts as the service's own load too.
        pids = {os.getpid(), *self._worker_pids()}
        for pid in list(self._processes):
            if pid not in pids:
                del self._processes[pid]
        total = 0.0
        for pid in pids:
            process = self._processes.get(pid)
            try:
                if process is None:
                    process = self._processes[pid] = psutil.Process(pid)
                    process.cpu_percent(interval=None)  # first sample primes the counter
                    continue
                total += process.cpu_percent(interval=None)
            except psutil.Error:
                self._processes.pop(pid, None)
        return total / (psutil.cpu_count() or 1)

    def _memory(self) -> tuple[str, dict]:
        if sys.platform == "darwin":
            try:
                level = int(subprocess.run(["sysctl", "-n", "kern.memorystatus_vm_pressure_level"],
                                           capture_output=True, text=True, timeout=2).stdout.strip())
                name = {1: "normal", 2: "warning", 4: "critical"}.get(level, "normal")
                return self._with_swap(name, {"source": "kern.memorystatus_vm_pressure_level", "value": level})
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
        if self._psi.exists():
            try:
                some = self._psi.read_text().splitlines()[0]
                avg10 = float(dict(item.split("=") for item in some.split()[1:])["avg10"])
                level = "critical" if avg10 >= PAUSE_MEMORY_PSI_DEFAULT else (
                    "warning" if avg10 >= RESUME_MEMORY_PSI_DEFAULT else "normal")
                return level, {"source": "psi", "some_avg10": avg10}
            except (OSError, ValueError, KeyError, IndexError):
                pass
        memory = psutil.virtual_memory()
        ratio = memory.available / memory.total
        level = "critical" if ratio <= PAUSE_AVAILABLE_RATIO_DEFAULT else (
            "warning" if ratio <= RESUME_AVAILABLE_RATIO_DEFAULT else "normal")
        return self._with_swap(level, {"source": "available_ratio", "available_ratio": round(ratio, 4)})

    def read(self) -> Readings | None:
        """Return new readings, or None while the sampling window is shorter than a second.

        A CPU percentage over a few milliseconds is mostly noise: the
        supervisor starting its workers reads as 100 %.
        """
        elapsed = time.monotonic() - self._sampled_at
        if elapsed < MIN_SAMPLE_SECONDS:
            return None
        self._sampled_at = time.monotonic()
        self._update_swap_rate(elapsed)
        system = psutil.cpu_percent(interval=None)
        other = max(0.0, system - self._own_cpu_percent())
        level, detail = self._memory()
        return Readings(other_cpu_percent=round(other, 1), memory_level=level, memory_detail=detail)


class Throttle:
    """Hysteresis state machine over readings: ``running`` or ``throttled`` with a reason."""

    def __init__(self, reader, *, pause_cpu_percent: float = PAUSE_CPU_PERCENT_DEFAULT,
                 resume_cpu_percent: float = RESUME_CPU_PERCENT_DEFAULT):
        if resume_cpu_percent > pause_cpu_percent:
            raise ValueError("resume_cpu_percent must not exceed pause_cpu_percent")
        self._reader = reader
        self.pause_cpu_percent = pause_cpu_percent
        self.resume_cpu_percent = resume_cpu_percent
        self.reason: str | None = None
        # time.time() when the current pause began.
        self.since: float | None = None
        self.readings: Readings | None = None

    @property
    def is_throttled(self) -> bool:
        return self.reason is not None

    def update(self) -> bool:
        """Take a reading and return whether the state changed."""
        readings = self._reader.read()
        if readings is None:
            return False
        self.readings = readings
        previous = self.reason
        if self.reason is None:
            if readings.other_cpu_percent > self.pause_cpu_percent:
                self.reason = "cpu"
            elif readings.memory_level == "critical":
                self.reason = "memory"
        elif self.reason == "cpu" and readings.other_cpu_percent < self.resume_cpu_percent:
            self.reason = "memory" if readings.memory_level == "critical" else None
        elif self.reason == "memory" and readings.memory_level == "normal":
            self.reason = "cpu" if readings.other_cpu_percent > self.pause_cpu_percent else None
        if previous is None and self.reason is not None:
            self.since = time.time()
        elif self.reason is None:
            self.since = None
        return previous != self.reason

    def state(self) -> dict:
        """Return the state as stored in the supervisors row."""
        document: dict = {"state": "throttled" if self.reason else "running", "reason": self.reason}
        if self.since is not None:
            document["since"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since))
        if self.readings is not None:
            document["readings"] = {"other_cpu_percent": self.readings.other_cpu_percent,
                                    "memory_level": self.readings.memory_level,
                                    **self.readings.memory_detail}
        return document
