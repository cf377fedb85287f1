"""Strict JSON for parameters and results: supervisor.payloads."""

from __future__ import annotations

import json
import math

import pytest

from supervisor import payloads
from supervisor.payloads import NON_FINITE_KEY, PayloadError


def nested_lists(levels: int) -> object:
    """Return 0 wrapped in ``levels`` lists, so the 0 sits at depth ``levels``."""
    value: object = 0
    for _ in range(levels):
        value = [value]
    return value


# canonical ---------------------------------------------------------------


def test_canonical_sorts_keys_without_spaces():
    assert payloads.canonical({"b": 1, "a": [1, 2], "c": {"z": None, "y": True}}) == (
        '{"a":[1,2],"b":1,"c":{"y":true,"z":null}}'
    )


def test_canonical_ignores_key_insertion_order():
    first = {"steps": 3, "nested": {"x": 1, "y": [{"b": 2, "a": 1}]}}
    second = {"nested": {"y": [{"a": 1, "b": 2}], "x": 1}, "steps": 3}

    assert payloads.canonical(first) == payloads.canonical(second)


def test_canonical_keeps_list_order():
    assert payloads.canonical([2, 1]) != payloads.canonical([1, 2])


def test_canonical_keeps_non_ascii_text():
    assert payloads.canonical({"name": "Zürich ✓"}) == '{"name":"Zürich ✓"}'


def test_canonical_writes_tuple_as_list():
    assert payloads.canonical((1, "a")) == '[1,"a"]'


def test_canonical_keeps_large_integers_exact():
    big = 2**100 + 1

    text = payloads.canonical({"n": big, "m": -big})

    assert text == f'{{"m":{-big},"n":{big}}}'
    assert payloads.loads_strict(text)["n"] == big


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_canonical_rejects_non_finite_float(value):
    with pytest.raises(PayloadError) as caught:
        payloads.canonical({"a": [1.0, value]})

    assert caught.value.path == "/a/1"
    assert "finite" in caught.value.reason


def test_canonical_rejects_nul_in_value():
    with pytest.raises(PayloadError) as caught:
        payloads.canonical({"log": "a\x00b"})

    assert caught.value.path == "/log"
    assert "NUL" in caught.value.reason


def test_canonical_rejects_nul_in_key():
    with pytest.raises(PayloadError) as caught:
        payloads.canonical({"outer": {"a\x00": 1}})

    assert caught.value.path == "/outer"
    assert "NUL" in caught.value.reason


def test_canonical_rejects_lone_surrogate_value():
    with pytest.raises(PayloadError) as caught:
        payloads.canonical(["ok", "\ud800"])

    assert caught.value.path == "/1"
    assert "surrogate" in caught.value.reason


def test_canonical_rejects_lone_surrogate_key():
    with pytest.raises(PayloadError) as caught:
        payloads.canonical({"\udfff": 1})

    assert caught.value.path == "/"
    assert "surrogate" in caught.value.reason


def test_canonical_rejects_non_string_key():
    with pytest.raises(PayloadError) as caught:
        payloads.canonical({"a": {1: "x"}})

    assert caught.value.path == "/a"
    assert "not a string" in caught.value.reason


@pytest.mark.parametrize("value", [{1, 2}, b"bytes", object(), 1 + 2j])
def test_canonical_rejects_non_json_type(value):
    with pytest.raises(PayloadError) as caught:
        payloads.canonical({"v": value})

    assert caught.value.path == "/v"
    assert "not a JSON type" in caught.value.reason


def test_canonical_escapes_pointer_tokens():
    with pytest.raises(PayloadError) as caught:
        payloads.canonical({"a/b": {"c~d": float("nan")}})

    assert caught.value.path == "/a~1b/c~0d"


def test_canonical_accepts_depth_at_limit():
    assert payloads.canonical(nested_lists(32)) == "[" * 32 + "0" + "]" * 32


def test_canonical_rejects_depth_over_limit():
    with pytest.raises(PayloadError) as caught:
        payloads.canonical(nested_lists(33))

    assert "deeper than 32" in caught.value.reason


def test_canonical_depth_limit_is_configurable():
    with pytest.raises(PayloadError):
        payloads.canonical(nested_lists(4), max_depth=3)


def test_canonical_counts_dict_levels_for_depth():
    value: object = 0
    for _ in range(33):
        value = {"k": value}

    with pytest.raises(PayloadError):
        payloads.canonical(value)


def test_payload_error_message_names_pointer():
    error = PayloadError("", "bad")

    assert error.path == "/"
    assert str(error) == "/: bad"


def test_payload_error_is_value_error():
    assert issubclass(PayloadError, ValueError)


# loads_strict --------------------------------------------------------------


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", '{"a": [1, NaN]}'])
def test_loads_strict_rejects_non_finite_token(text):
    with pytest.raises(ValueError, match="not valid JSON"):
        payloads.loads_strict(text)


@pytest.mark.parametrize("text", ["1e400", "-1e400", '{"x": 1.5e309}'])
def test_loads_strict_rejects_overflowing_number(text):
    with pytest.raises(ValueError, match="out of range"):
        payloads.loads_strict(text)


def test_loads_strict_accepts_finite_numbers():
    assert payloads.loads_strict('{"a": 1.5, "b": -2e10, "c": 1e-400}') == {"a": 1.5, "b": -2e10, "c": 0.0}


def test_loads_strict_keeps_large_integers_exact():
    assert payloads.loads_strict("123456789012345678901234567890") == 123456789012345678901234567890


def test_loads_strict_round_trips_canonical():
    document = {"ids": ["s-1", "s-2"], "window": {"from": 0, "to": 10**20}, "ratio": 0.1}

    assert payloads.loads_strict(payloads.canonical(document)) == document


def test_json_loads_accepts_nan_and_overflow():
    # The reason loads_strict exists: the standard parser takes these.
    assert math.isnan(json.loads("NaN"))
    assert math.isinf(json.loads("1e400"))


# replace_non_finite and summary_document -----------------------------------


def test_replace_non_finite_lists_pointers():
    document = {"a": [1.0, float("nan")], "b": {"c/d": float("-inf")}, "e": 2}

    clean, replaced = payloads.replace_non_finite(document)

    assert clean == {"a": [1.0, None], "b": {"c/d": None}, "e": 2}
    assert replaced == ["/a/1", "/b/c~1d"]


def test_replace_non_finite_leaves_input_unchanged():
    document = {"a": [float("inf")]}

    payloads.replace_non_finite(document)

    assert math.isinf(document["a"][0])


def test_replace_non_finite_top_level_value():
    clean, replaced = payloads.replace_non_finite(float("nan"))

    assert clean is None
    assert replaced == ["/"]


def test_replace_non_finite_without_any():
    document = {"a": [1, 2.5, "x", None, True]}

    clean, replaced = payloads.replace_non_finite(document)

    assert clean == document
    assert replaced == []


def test_summary_document_keeps_finite_summary():
    assert payloads.summary_document({"r": 0.5, "n": 3}) == {"r": 0.5, "n": 3}


def test_summary_document_records_replaced_pointers():
    document = payloads.summary_document({"r": float("nan"), "n": [float("inf")]})

    assert document == {"r": None, "n": [None], NON_FINITE_KEY: ["/r", "/n/0"]}


def test_summary_document_wraps_non_dict_summary():
    document = payloads.summary_document([1.0, float("nan")])

    assert document == {"value": [1.0, None], NON_FINITE_KEY: ["/1"]}


def test_summary_document_wraps_bare_non_finite():
    assert payloads.summary_document(float("inf")) == {"value": None, NON_FINITE_KEY: ["/"]}


def test_summary_document_result_is_canonical_json():
    document = payloads.summary_document({"r": float("nan")})

    assert payloads.loads_strict(payloads.canonical(document)) == document


def test_summary_document_rejects_nul():
    with pytest.raises(PayloadError):
        payloads.summary_document({"text": "\x00"})


def test_summary_document_allows_depth_64():
    payloads.summary_document(nested_lists(64))

    with pytest.raises(PayloadError):
        payloads.summary_document(nested_lists(65))


# job_key -------------------------------------------------------------------


def test_job_key_pinned_value():
    # Keys are stored with queued jobs, so a change here breaks deduplication
    # between jobs submitted before an upgrade and jobs submitted after it.
    params = payloads.canonical({"steps": 3, "step_seconds": 0.0})

    assert payloads.job_key("noop", params) == (
        "noop:65ada6bbe85809c0599896b68c4e64a92b45ffc9d7a3a130591e60412b15fc25"
    )


def test_job_key_ignores_parameter_order():
    first = payloads.canonical({"a": 1, "b": {"x": 1, "y": 2}})
    second = payloads.canonical({"b": {"y": 2, "x": 1}, "a": 1})

    assert payloads.job_key("noop", first) == payloads.job_key("noop", second)


def test_job_key_differs_by_analysis():
    params = payloads.canonical({"a": 1})

    assert payloads.job_key("noop", params) != payloads.job_key("other", params)


def test_job_key_differs_by_params():
    assert payloads.job_key("noop", payloads.canonical({"a": 1})) != payloads.job_key(
        "noop", payloads.canonical({"a": 2})
    )


def test_job_key_separates_name_from_params():
    # The newline between name and parameters keeps "ab" + "c" apart from "a" + "bc".
    assert payloads.job_key("ab", "c") != payloads.job_key("a", "bc")


def test_job_key_fits_key_column_limit():
    from supervisor.store import MAX_KEY_LENGTH

    key = payloads.job_key("a" * 63, payloads.canonical({"x": "y" * 10_000}))

    assert len(key) <= MAX_KEY_LENGTH
