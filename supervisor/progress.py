"""Per-slot progress records in shared memory, one writer and many readers each.

The supervisor creates one ``SlotRecord`` per worker slot inside a single
``multiprocessing.RawArray`` and hands the array to every worker when it
starts it. The array lives in an unlinked temporary file mapped into each
process, so it has no name, needs no resource tracker and disappears with the
last process that maps it, even after SIGKILL.

A worker writes its own slot through ``SlotWriter``; the supervisor reads
every slot through ``ProgressRecords``. The two sides never share a lock, so
a killed worker cannot leave the supervisor blocked. Consistency comes from a
seqlock instead. The writer makes ``seq`` odd, writes the fields and makes
``seq`` even again. A reader copies the record and keeps the copy only if
``seq`` was even and unchanged across the copy.

Memory ordering: ctypes has no fence instruction. ``_Fence`` releases and then
re-acquires a process-local ``threading.Lock`` that it keeps held. CPython 3.11
implements that lock with a POSIX semaphore on Linux and with a pthread mutex
and condition variable on macOS, which lacks sem_timedwait (see
Python/thread_pthread.h). Either way the release ends in an atomic
store-release and the acquire starts with an atomic load-acquire. arm64 (Apple silicon included) never reorders a store-release
with a later load-acquire, so every access before the fence is ordered before
every access after it. x86-64 does not reorder stores with stores or loads with
loads, which is all a seqlock needs, so there the fence only costs time.
NOTE: the arm64 argument comes from the architecture's ordering rules and the
CPython sources, and was not tested on arm64 hardware.

Fields outside the seqlock: ``cancel`` is written only by the supervisor, as
one aligned 4-byte store. ``process_groups`` is append-only during a job (the
entry is written before ``process_group_count`` grows), so the supervisor can
read it even after the worker died in the middle of a seqlock write.
"""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing
import os
import threading
import time
from multiprocessing.context import BaseContext

PHASE_BYTES = 64
MESSAGE_BYTES = 160
MAX_PROCESS_GROUPS = 8

# A reader that sees a write in progress this many times in a row gives up and
# returns None, so a worker that died mid-write cannot make the supervisor spin.
READ_RETRIES = 100


class SlotRecord(ctypes.Structure):
    """Progress, cancel flag and process groups of the job on one worker slot."""

    _fields_ = [
        ("seq", ctypes.c_uint64),
        ("job_id", ctypes.c_int64),  # 0 while the slot is idle
        ("completed", ctypes.c_int64),
        ("total", ctypes.c_int64),  # -1 while unknown
        ("phase_started_at", ctypes.c_double),  # time.time()
        ("updated_at", ctypes.c_double),  # time.time()
        ("attempt", ctypes.c_int32),
        ("cancel", ctypes.c_uint32),
        ("process_group_count", ctypes.c_uint32),
        ("process_groups", ctypes.c_int32 * MAX_PROCESS_GROUPS),
        ("phase", ctypes.c_char * PHASE_BYTES),
        ("message", ctypes.c_char * MESSAGE_BYTES),
        # time.monotonic() after which the run's lease may have passed to
        # another supervisor; 0 while unset. Written only by the supervisor.
        ("run_deadline", ctypes.c_double),
    ]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A consistent copy of one slot's progress; ``job_id`` 0 means idle."""

    job_id: int
    attempt: int
    completed: int
    total: int | None
    phase: str
    message: str
    phase_started_at: float
    updated_at: float


class ProcessGroupLimitError(RuntimeError):
    """A job registered more live process groups than a slot record can store."""


def encode_text(text: str, limit: int) -> bytes:
    """Encode ``text`` as UTF-8 in at most ``limit`` bytes, cutting between characters.

    NUL characters are dropped because a NUL ends the C string in the record.
    Lone surrogates become ``?``.
    """
    encoded = text.replace("\x00", "").encode("utf-8", "replace")
    if len(encoded) <= limit:
        return encoded
    # Decoding with "ignore" drops only the partial character at the cut.
    return encoded[:limit].decode("utf-8", "ignore").encode("utf-8")


class _Fence:
    """A full memory fence built from a held lock; see the module docstring.

    Not thread-safe: callers serialise fence calls with a lock of their own.
    """

    def __init__(self) -> None:
        lock = threading.Lock()
        lock.acquire()
        self.release = lock.release
        self.acquire = lock.acquire

    def __call__(self) -> None:
        self.release()
        self.acquire()


def create_array(slots: int, context: BaseContext | None = None) -> ctypes.Array:
    """Create a shared array of ``slots`` idle records for workers started by ``context``."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    context = context or multiprocessing.get_context("spawn")
    array = context.RawArray(SlotRecord, slots)
    for record in array:
        record.total = -1
    return array


class SlotWriter:
    """The worker side of one slot: the only writer of that slot's job fields.

    Thread-safe, so a body may report progress from several threads.
    Completed never decreases within a phase and stays in ``[0, total]`` when
    the total is known. A phase change resets it to 0, and a negative total
    means unknown.
    """

    def __init__(self, array: ctypes.Array, slot: int) -> None:
        # The shared record; others may read it, but write it only through this class.
        self.record = array[slot]
        self._record = self.record
        self._fence = _Fence()
        lock = threading.Lock()
        self._lock = lock
        # Pre-bound to keep progress(), the hot path, to plain local calls.
        self._lock_acquire = lock.acquire
        self._lock_release = lock.release
        self._fence_release = self._fence.release
        self._fence_acquire = self._fence.acquire
        self._clock = time.time
        self._completed = 0
        self._total = -1
        self._process_groups: list[int] = []

    @property
    def process_groups(self) -> list[int]:
        """Process groups registered by the current job, in registration order."""
        # No lock, because the lifeline thread reads this while exiting. Copying
        # a list is atomic under the GIL.
        return list(self._process_groups)

    def begin_job(self, job_id: int, attempt: int) -> None:
        """Mark the slot busy with ``job_id`` and clear the previous job's fields."""
        if job_id <= 0:
            raise ValueError(f"job_id must be > 0, got {job_id}")
        self._write_job(job_id, attempt)

    def end_job(self) -> None:
        """Mark the slot idle and forget the job's process groups."""
        self._write_job(0, 0)

    def _write_job(self, job_id: int, attempt: int) -> None:
        record = self._record
        with self._lock:
            now = self._clock()
            self._begin_write()
            record.job_id = job_id
            record.attempt = attempt
            record.completed = 0
            record.total = -1
            record.phase = b""
            record.message = b""
            record.phase_started_at = now
            record.updated_at = now
            # No job is running here, so no reader needs these groups.
            record.process_group_count = 0
            self._end_write()
            self._completed = 0
            self._total = -1
            self._process_groups = []

    def progress(self, completed: int, total: int | None = None, message: str | None = None) -> None:
        """Record ``completed`` units of the current phase, and ``total`` and ``message`` when given."""
        self._lock_acquire()
        try:
            if total is not None:
                self._total = total if total >= 0 else -1
            if completed < self._completed:
                completed = self._completed
            if 0 <= self._total < completed:
                completed = self._total
            self._completed = completed

            record = self._record
            now = self._clock()
            seq = record.seq + 1
            record.seq = seq
            self._fence_release()
            self._fence_acquire()
            record.completed = completed
            if total is not None:
                record.total = self._total
            if message is not None:
                record.message = encode_text(message, MESSAGE_BYTES)
            record.updated_at = now
            self._fence_release()
            self._fence_acquire()
            record.seq = seq + 1
        finally:
            self._lock_release()

    def phase(self, name: str, total: int | None = None) -> None:
        """Start phase ``name`` with completed 0, a new start time and an empty message."""
        encoded = encode_text(name, PHASE_BYTES)
        record = self._record
        with self._lock:
            now = self._clock()
            self._total = total if total is not None and total >= 0 else -1
            self._completed = 0
            self._begin_write()
            record.phase = encoded
            record.message = b""
            record.completed = 0
            record.total = self._total
            record.phase_started_at = now
            record.updated_at = now
            self._end_write()

    def add_process_group(self, pgid: int) -> None:
        """Store ``pgid`` in the record so the supervisor can kill that process group.

        When the record is full, the entry of a group that no longer exists is
        reused. Raises ``ProcessGroupLimitError`` when ``MAX_PROCESS_GROUPS`` groups
        registered by this job are still alive.
        """
        if pgid <= 1:
            raise ValueError(f"process group id must be > 1, got {pgid}")
        record = self._record
        with self._lock:
            if pgid in self._process_groups:
                return
            index = len(self._process_groups)
            if index >= MAX_PROCESS_GROUPS:
                index = self._find_dead_group()
            # The entry must be visible before a reader can count it.
            record.process_groups[index] = pgid
            self._fence()
            if index == len(self._process_groups):
                self._process_groups.append(pgid)
                record.process_group_count = index + 1
            else:
                self._process_groups[index] = pgid

    def _find_dead_group(self) -> int:
        for index, pgid in enumerate(self._process_groups):
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return index
            except PermissionError:
                pass  # The group exists but belongs to another user now.
        raise ProcessGroupLimitError(
            f"cannot register more than {MAX_PROCESS_GROUPS} live process groups per job "
            f"(registered: {self._process_groups}); wait for finished groups before starting new ones"
        )

    def _begin_write(self) -> None:
        self._record.seq += 1
        self._fence()

    def _end_write(self) -> None:
        self._fence()
        self._record.seq += 1


class ProgressRecords:
    """The supervisor side of the shared array: reads every slot, writes cancel flags.

    Thread-safe. ``array`` is the object to hand to each worker at start.
    """

    def __init__(self, slots: int, context: BaseContext | None = None) -> None:
        self.array = create_array(slots, context)
        self.slots = slots
        self._fence = _Fence()
        self._lock = threading.Lock()

    def read_slot(self, slot: int) -> Snapshot | None:
        """Copy slot ``slot`` consistently, or return None if a write stayed in progress.

        None means the worker kept writing through ``READ_RETRIES`` attempts,
        or died in the middle of a write and left ``seq`` odd.
        """
        record = self.array[slot]
        with self._lock:
            for _ in range(READ_RETRIES):
                seq_before = record.seq
                self._fence()
                copy = SlotRecord.from_buffer_copy(record)
                self._fence()
                if seq_before % 2 == 0 and record.seq == seq_before:
                    return _snapshot_from(copy)
        return None

    def set_cancel(self, slot: int, flag: bool) -> None:
        """Set or clear the cancel flag that the job on ``slot`` polls."""
        self.array[slot].cancel = 1 if flag else 0

    def set_run_deadline(self, slot: int, deadline: float) -> None:
        """Set the time.monotonic() after which the job on ``slot`` must stop (0 clears it).

        One aligned 8-byte store, which the worker reads without the seqlock.
        """
        self.array[slot].run_deadline = deadline

    def is_cancel_set(self, slot: int) -> bool:
        """Return whether the cancel flag of ``slot`` is set."""
        return self.array[slot].cancel != 0

    def process_groups(self, slot: int) -> list[int]:
        """Return the process groups that the job on ``slot`` registered.

        Safe to call while the worker runs or after it died, because the list
        is append-only during a job. A group that is being registered at the
        same moment may be missing.
        """
        record = self.array[slot]
        with self._lock:
            count = min(record.process_group_count, MAX_PROCESS_GROUPS)
            self._fence()
            return [pgid for pgid in record.process_groups[:count] if pgid > 1]

    def reset_slot(self, slot: int) -> None:
        """Zero slot ``slot``, leaving ``seq`` even.

        Call only while no worker runs on the slot, because this writes the
        fields that the worker owns.
        """
        record = self.array[slot]
        with self._lock:
            seq = record.seq
            ctypes.memset(ctypes.addressof(record), 0, ctypes.sizeof(SlotRecord))
            record.total = -1
            record.seq = seq + 2 - seq % 2


def _snapshot_from(record: SlotRecord) -> Snapshot:
    return Snapshot(
        job_id=record.job_id,
        attempt=record.attempt,
        completed=record.completed,
        total=record.total if record.total >= 0 else None,
        phase=record.phase.decode("utf-8", "replace"),
        message=record.message.decode("utf-8", "replace"),
        phase_started_at=record.phase_started_at,
        updated_at=record.updated_at,
    )
