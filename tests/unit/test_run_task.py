"""Tests of run_task and JobContext in the test process: outcome mapping and result files."""

from __future__ import annotations

import hashlib
import math
import os

import numpy
import pytest

from analyses import registry
from analyses.errors import AnalysisError, InvalidParams, RetryableError
from supervisor.job_context import check_result_name
from supervisor.progress import ProgressRecords, SlotWriter
from supervisor.worker import ParentDeathSignal, run_task


class QuotaExceeded(AnalysisError):
    """The analysis exceeded its quota."""

    code = "quota_exceeded"


def _save_results(params, context):
    context.phase("save", total=2)
    context.save_array("matrix", numpy.arange(12, dtype=numpy.float64).reshape(3, 4))
    context.progress(1)
    context.save_json("stats", {"mean": 5.5, "nan": math.nan})
    context.progress(2, message="saved")
    return {"saved": 2}


def _raise(params, context):
    raise params["error"]


def _return(params, context):
    return params["summary"]


def _check_cancel(params, context):
    context.progress(1)
    context.check_cancelled()
    return "not cancelled"


for _name, _body in [("test-save", _save_results), ("test-raise", _raise), ("test-return", _return),
                     ("test-cancel", _check_cancel)]:
    if _name not in {analysis.name for analysis in registry.all_analyses()}:
        # "json" parameters pass any value through, exceptions included.
        registry.register(registry.Analysis(
            name=_name, summary="test analysis", body=_body,
            params=(registry.Param("error", "json", "exception to raise"),
                    registry.Param("summary", "json", "summary to return"))))


@pytest.fixture
def records() -> ProgressRecords:
    return ProgressRecords(1)


@pytest.fixture
def run(records, tmp_path):
    writer = SlotWriter(records.array, 0)
    parent_death = ParentDeathSignal(enabled=False)

    def run(analysis: str, params: dict | None = None, job_id: int = 11) -> dict:
        task = {"job_id": job_id, "attempt": 2, "attempt_token": "token", "analysis": analysis,
                "params": params or {}, "results_dir": str(tmp_path), "database_url": None}
        return run_task(task, writer, parent_death, 0)

    return run


def test_results_saved_and_indexed(run, records, tmp_path):
    outcome = run("test-save")

    assert outcome["status"] == "succeeded"
    assert outcome["summary"] == {"saved": 2}
    matrix, stats = outcome["results"]
    assert matrix["name"] == "matrix"
    assert matrix["kind"] == "file"
    assert matrix["format"] == "npy"
    assert matrix["path"] == str(tmp_path / "11" / "2" / "matrix.npy")
    with open(matrix["path"], "rb") as file:
        content = file.read()
    assert matrix["size_bytes"] == len(content)
    assert matrix["sha256"] == hashlib.sha256(content).hexdigest()
    assert numpy.array_equal(numpy.load(matrix["path"]), numpy.arange(12.0).reshape(3, 4))
    assert not [name for name in os.listdir(tmp_path / "11" / "2") if name.endswith(".partial")]

    assert stats["kind"] == "inline"
    assert stats["value"]["mean"] == 5.5
    assert math.isnan(stats["value"]["nan"])


def test_slot_idle_after_task(run, records):
    run("test-save")
    assert records.read_slot(0).job_id == 0


@pytest.mark.parametrize("name", ["", "Upper", "a.b", "a/b", "x" * 65, "tab\t", "line\n"])
def test_result_name_rejected(name):
    with pytest.raises(ValueError, match="invalid result name"):
        check_result_name(name)


@pytest.mark.parametrize("name", ["a", "matrix_2", "x-y", "0" * 64])
def test_result_name_accepted(name):
    check_result_name(name)


@pytest.mark.parametrize(
    ("error", "code", "retryable"),
    [
        (InvalidParams("steps", -1, "must be >= 0"), "invalid_params", False),
        (RetryableError("database busy"), "analysis_error", True),
        (AnalysisError("bad input", {"row": 3}), "analysis_error", False),
        (QuotaExceeded(), "quota_exceeded", False),
        (RuntimeError("boom"), "analysis_error", False),
        (MemoryError(), "memory_limit", False),
    ],
)
def test_exception_mapping(run, error, code, retryable):
    outcome = run("test-raise", {"error": error})

    assert outcome["status"] == "failed"
    assert outcome["error"]["code"] == code
    assert outcome["retryable"] is retryable
    assert "Traceback" in outcome["error"]["traceback"]


def test_analysis_error_details_kept(run):
    outcome = run("test-raise", {"error": AnalysisError("bad input", {"row": 3, "value": object()})})
    assert outcome["error"]["message"] == "bad input"
    assert outcome["error"]["details"]["row"] == 3
    assert outcome["error"]["details"]["value"].startswith("<object object")


def test_unknown_analysis_is_invalid_params(run):
    outcome = run("no-such-analysis")
    assert outcome["error"]["code"] == "invalid_params"
    assert outcome["retryable"] is False


def test_cancel_flag_ends_cooperatively(run, records):
    records.set_cancel(0, True)
    outcome = run("test-cancel")

    assert outcome["status"] == "cancelled"
    assert outcome["error"]["details"] == {"stage": "cooperative"}


def test_summary_not_json_serialisable(run):
    outcome = run("test-return", {"summary": {"when": object()}})

    assert outcome["status"] == "failed"
    assert outcome["error"]["code"] == "analysis_error"
    assert "not JSON-serialisable" in outcome["error"]["message"]


def test_summary_nan_kept(run):
    outcome = run("test-return", {"summary": {"score": math.nan, "values": (1, math.inf)}})

    assert outcome["status"] == "succeeded"
    assert math.isnan(outcome["summary"]["score"])
    assert outcome["summary"]["values"] == [1, math.inf]
