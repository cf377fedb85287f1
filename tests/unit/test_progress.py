"""Tests of the shared-memory progress records: clamping, text limits and the seqlock."""

from __future__ import annotations

import multiprocessing
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor import progress
from supervisor.progress import MAX_PROCESS_GROUPS, MESSAGE_BYTES, PHASE_BYTES, ProgressRecords, SlotWriter


@pytest.fixture
def records() -> ProgressRecords:
    return ProgressRecords(3)


@pytest.fixture
def writer(records: ProgressRecords) -> SlotWriter:
    writer = SlotWriter(records.array, 1)
    writer.begin_job(42, 2)
    return writer


def test_new_records_are_idle(records):
    snapshot = records.read_slot(0)
    assert snapshot is not None
    assert snapshot.job_id == 0
    assert snapshot.total is None


def test_begin_job_sets_identity(records, writer):
    snapshot = records.read_slot(1)
    assert snapshot.job_id == 42
    assert snapshot.attempt == 2
    assert snapshot.completed == 0
    assert snapshot.phase == ""
    assert snapshot.phase_started_at <= snapshot.updated_at


def test_writer_touches_only_its_slot(records, writer):
    writer.progress(5, 10, "half")
    assert records.read_slot(0).job_id == 0
    assert records.read_slot(2).job_id == 0


def test_begin_job_rejects_idle_job_id(records):
    with pytest.raises(ValueError, match="job_id"):
        SlotWriter(records.array, 0).begin_job(0, 1)


def test_progress_never_decreases_within_phase(records, writer):
    writer.phase("load", total=100)
    writer.progress(30)
    writer.progress(10)
    assert records.read_slot(1).completed == 30


def test_progress_clamped_to_total(records, writer):
    writer.phase("load", total=100)
    writer.progress(150)
    assert records.read_slot(1).completed == 100


def test_progress_clamped_at_zero(records, writer):
    writer.phase("load", total=100)
    writer.progress(-5)
    assert records.read_slot(1).completed == 0


def test_progress_unbounded_without_total(records, writer):
    writer.phase("scan")
    writer.progress(10**12)
    snapshot = records.read_slot(1)
    assert snapshot.completed == 10**12
    assert snapshot.total is None


def test_progress_total_replaces_phase_total(records, writer):
    writer.phase("load", total=10)
    writer.progress(8, total=50)
    writer.progress(40)
    snapshot = records.read_slot(1)
    assert snapshot.total == 50
    assert snapshot.completed == 40


def test_lower_total_clamps_completed(records, writer):
    writer.phase("load", total=100)
    writer.progress(80)
    writer.progress(80, total=60)
    assert records.read_slot(1).completed == 60


def test_phase_change_resets_completed(records, writer):
    writer.phase("load", total=10)
    writer.progress(10, message="loaded")
    before = records.read_slot(1)
    time.sleep(0.01)
    writer.phase("fit", total=5)
    snapshot = records.read_slot(1)
    assert snapshot.phase == "fit"
    assert snapshot.completed == 0
    assert snapshot.total == 5
    assert snapshot.message == ""
    assert snapshot.phase_started_at > before.phase_started_at


def test_progress_keeps_message_when_omitted(records, writer):
    writer.progress(1, message="first")
    writer.progress(2)
    assert records.read_slot(1).message == "first"


def test_end_job_marks_slot_idle(records, writer):
    writer.phase("load", total=10)
    writer.progress(3, message="m")
    writer.end_job()
    snapshot = records.read_slot(1)
    assert snapshot.job_id == 0
    assert snapshot.phase == ""
    assert snapshot.message == ""


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("short", 10, b"short"),
        ("a" * 70, PHASE_BYTES, b"a" * PHASE_BYTES),
        # "é" is two bytes; a cut in its middle drops the whole character.
        ("abé", 3, b"ab"),
        ("€€", 5, "€".encode()),
        ("a\x00b", 10, b"ab"),
        ("\ud800x", 10, b"?x"),
    ],
)
def test_encode_text_cuts_at_character_boundary(text, limit, expected):
    assert progress.encode_text(text, limit) == expected


def test_long_texts_are_truncated(records, writer):
    writer.phase("φ" * 100)
    writer.progress(1, message="ü" * 200)
    snapshot = records.read_slot(1)
    assert snapshot.phase == "φ" * (PHASE_BYTES // 2)
    assert snapshot.message == "ü" * (MESSAGE_BYTES // 2)


def test_cancel_flag_round_trip(records, writer):
    assert not records.is_cancel_set(1)
    records.set_cancel(1, True)
    assert records.is_cancel_set(1)
    assert writer.record.cancel == 1
    assert not records.is_cancel_set(0)
    records.set_cancel(1, False)
    assert not records.is_cancel_set(1)


def test_writer_does_not_clear_cancel_flag(records, writer):
    records.set_cancel(1, True)
    writer.end_job()
    writer.begin_job(43, 1)
    assert records.is_cancel_set(1)


def test_process_groups_registered_in_order(records, writer):
    writer.add_process_group(1001)
    writer.add_process_group(1002)
    writer.add_process_group(1001)
    assert records.process_groups(1) == [1001, 1002]
    assert writer.process_groups == [1001, 1002]


def test_process_groups_cleared_at_end_job(records, writer):
    writer.add_process_group(1001)
    writer.end_job()
    assert records.process_groups(1) == []


def test_process_group_rejects_invalid_id(writer):
    with pytest.raises(ValueError, match="process group id"):
        writer.add_process_group(1)


def test_process_group_limit_reuses_dead_groups(records, writer):
    children = [subprocess.Popen(["sleep", "30"], start_new_session=True) for _ in range(MAX_PROCESS_GROUPS)]
    try:
        for child in children:
            writer.add_process_group(child.pid)
        with pytest.raises(progress.ProcessGroupLimitError):
            writer.add_process_group(999_999)

        children[3].kill()
        children[3].wait()
        writer.add_process_group(999_999)
        groups = records.process_groups(1)
        assert groups[3] == 999_999
        assert len(groups) == MAX_PROCESS_GROUPS
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_read_returns_none_during_endless_write(records):
    # A writer killed between its two seq increments leaves seq odd.
    records.array[2].seq = 7
    assert records.read_slot(2) is None


def test_reset_slot_recovers_from_torn_write(records, writer):
    records.array[1].seq += 1
    assert records.read_slot(1) is None
    records.reset_slot(1)
    snapshot = records.read_slot(1)
    assert snapshot is not None
    assert snapshot.job_id == 0
    assert records.array[1].seq % 2 == 0


# Writer side of the seqlock property test; runs in a spawned process.
def _hammer(array, slot: int, text: str, seconds: float, ready) -> None:
    writer = SlotWriter(array, slot)
    writer.begin_job(7, 1)
    ready.set()
    deadline = time.monotonic() + seconds
    counter = 0
    while time.monotonic() < deadline:
        counter += 1
        if counter % 50 == 0:
            writer.phase(f"phase-{counter // 50}-{text}")
        # Every field of a progress write derives from counter, so a record
        # mixing two writes breaks one of the reader's equations.
        writer.progress(counter, total=counter + 7, message=f"{counter}:{counter + 7}:{text}")


def _check_consistent(snapshot: progress.Snapshot, text: str) -> None:
    if snapshot.message == "":
        # Just after phase(): completed was reset and the phase total unset.
        assert snapshot.completed == 0, snapshot
        assert snapshot.total is None, snapshot
        return
    expected_message = progress.encode_text(f"{snapshot.completed}:{snapshot.total}:{text}", MESSAGE_BYTES)
    assert snapshot.message.encode() == expected_message, snapshot
    assert snapshot.total == snapshot.completed + 7, snapshot
    if snapshot.phase:
        phase_number = int(snapshot.phase.split("-")[1])
        assert snapshot.completed // 50 == phase_number, snapshot
    assert snapshot.updated_at >= snapshot.phase_started_at, snapshot


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                    max_size=200))
def test_reader_never_sees_torn_record(text):
    context = multiprocessing.get_context("spawn")
    records = ProgressRecords(2, context)
    ready = context.Event()
    writer = context.Process(target=_hammer, args=(records.array, 1, text, 1.0, ready))
    writer.start()
    try:
        assert ready.wait(30), "writer process did not start"
        consistent = 0
        retried = 0
        while writer.is_alive():
            snapshot = records.read_slot(1)
            if snapshot is None:
                retried += 1
                continue
            _check_consistent(snapshot, text)
            consistent += 1
        writer.join(5)
        assert writer.exitcode == 0
        assert consistent > 1000, f"only {consistent} consistent reads ({retried} gave up)"
    finally:
        if writer.is_alive():
            writer.kill()
            writer.join()
