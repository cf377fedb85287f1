"""Throttle hysteresis with injected readings."""

from __future__ import annotations

from supervisor.throttle import Readings, Throttle


class FakeReader:
    def __init__(self):
        self.next: Readings | None = None

    def read(self):
        return self.next


def reading(cpu: float, memory: str = "normal") -> Readings:
    return Readings(other_cpu_percent=cpu, memory_level=memory, memory_detail={})


def test_throttle_pauses_above_and_resumes_below():
    reader = FakeReader()
    throttle = Throttle(reader, pause_cpu_percent=80, resume_cpu_percent=60)
    states = []
    for cpu in (50, 85, 75, 65, 59, 70):
        reader.next = reading(cpu)
        throttle.update()
        states.append(throttle.reason)

    assert states == [None, "cpu", "cpu", "cpu", None, None]


def test_throttle_ignores_missing_readings():
    reader = FakeReader()
    throttle = Throttle(reader)

    assert throttle.update() is False
    assert not throttle.is_throttled
    assert throttle.state()["state"] == "running"


def test_throttle_memory_pressure_pauses_until_normal():
    reader = FakeReader()
    throttle = Throttle(reader)
    reasons = []
    for memory in ("critical", "warning", "normal"):
        reader.next = reading(10, memory)
        throttle.update()
        reasons.append(throttle.reason)

    assert reasons == ["memory", "memory", None]


def test_throttle_state_reports_reason_and_readings():
    reader = FakeReader()
    throttle = Throttle(reader)
    reader.next = reading(99)
    throttle.update()

    state = throttle.state()

    assert state["state"] == "throttled"
    assert state["reason"] == "cpu"
    assert state["readings"]["other_cpu_percent"] == 99
