"""The job status transition table in supervisor.transitions."""

from __future__ import annotations

import itertools

import pytest

from supervisor import transitions
from supervisor.transitions import Status

# Every transition the store performs, written out independently of ALLOWED so
# that an accidental edit of the table fails here.
EXPECTED_ALLOWED = {
    (Status.QUEUED, Status.RUNNING),
    (Status.QUEUED, Status.CANCELLED),
    (Status.QUEUED, Status.EXPIRED),
    (Status.RUNNING, Status.SUCCEEDED),
    (Status.RUNNING, Status.FAILED),
    (Status.RUNNING, Status.CANCELLED),
    (Status.RUNNING, Status.QUEUED),
    (Status.SUCCEEDED, Status.EXPIRED),
}
ALL_PAIRS = list(itertools.product(Status, Status))


def test_status_values_are_lowercase_names():
    assert [str(status) for status in Status] == [
        "queued", "running", "succeeded", "failed", "cancelled", "expired",
    ]


def test_allowed_table_matches_expected_pairs():
    assert set(transitions.ALLOWED) == EXPECTED_ALLOWED


def test_allowed_table_names_every_operation():
    for pair, operation in transitions.ALLOWED.items():
        assert operation.strip(), f"{pair} has no operation"


@pytest.mark.parametrize(("current", "target"), sorted(EXPECTED_ALLOWED))
def test_is_allowed_accepts_listed_pair(current, target):
    assert transitions.is_allowed(current, target)


@pytest.mark.parametrize(
    ("current", "target"), [pair for pair in ALL_PAIRS if pair not in EXPECTED_ALLOWED]
)
def test_is_allowed_rejects_unlisted_pair(current, target):
    assert not transitions.is_allowed(current, target)


def test_is_allowed_rejects_staying_in_place():
    for status in Status:
        assert not transitions.is_allowed(status, status), status


def test_is_allowed_accepts_plain_strings():
    assert transitions.is_allowed("queued", "running")
    assert not transitions.is_allowed("failed", "queued")


def test_is_allowed_unknown_status_raises():
    with pytest.raises(ValueError):
        transitions.is_allowed("sleeping", "running")


@pytest.mark.parametrize("status", sorted(transitions.TERMINAL))
def test_terminal_status_has_no_way_back(status):
    targets = {target for (current, target) in transitions.ALLOWED if current == status}

    if status == Status.SUCCEEDED:
        assert targets == {Status.EXPIRED}
    else:
        assert targets == set()


def test_terminal_and_active_partition_statuses():
    assert transitions.ACTIVE | transitions.TERMINAL == set(Status)
    assert transitions.ACTIVE & transitions.TERMINAL == set()


@pytest.mark.parametrize("status", list(Status))
def test_is_terminal_matches_terminal_set(status):
    assert transitions.is_terminal(status) == (status in transitions.TERMINAL)


def test_is_terminal_accepts_plain_strings():
    assert transitions.is_terminal("expired")
    assert not transitions.is_terminal("running")


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (Status.QUEUED, ["running"]),
        (Status.RUNNING, ["queued"]),
        (Status.SUCCEEDED, ["running"]),
        (Status.FAILED, ["running"]),
        (Status.CANCELLED, ["queued", "running"]),
        (Status.EXPIRED, ["queued", "succeeded"]),
    ],
)
def test_sources_lists_origins_sorted(target, expected):
    assert transitions.sources(target) == expected


def test_sources_returns_plain_strings():
    for target in Status:
        for source in transitions.sources(target):
            assert type(source) is str, (target, source)


def test_sources_accepts_plain_string():
    assert transitions.sources("expired") == ["queued", "succeeded"]


def test_sources_unknown_status_raises():
    with pytest.raises(ValueError):
        transitions.sources("sleeping")
