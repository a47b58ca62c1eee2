"""Preference validation, canonical form, snapping and fingerprints."""

from __future__ import annotations

import math

import pytest

from reprmerge_core.preference import PreferenceError, canonical_preference, snap

TASKS = ("sms_spam", "trec6", "movie_sentiment")


def test_mapping_and_list_give_the_same_canonical_preference() -> None:
    a = canonical_preference({"sms_spam": 2, "trec6": 1, "movie_sentiment": 1}, TASKS)
    b = canonical_preference([0.5, 0.25, 0.25], TASKS)
    assert a == b
    assert a.weights == (0.5, 0.25, 0.25)
    assert a.fingerprint == b.fingerprint
    assert math.fsum(a.weights) == pytest.approx(1.0)


def test_extreme_magnitudes_normalise_without_overflow() -> None:
    assert canonical_preference([1e308, 1e308, 0], TASKS).weights == (0.5, 0.5, 0.0)
    assert canonical_preference([1e-300, 3e-300, 0], TASKS).weights == (0.25, 0.75, 0.0)


def test_missing_tasks_in_a_mapping_weigh_zero() -> None:
    p = canonical_preference({"trec6": 3.0}, TASKS)
    assert p.weights == (0.0, 1.0, 0.0)


def test_scale_and_float_noise_share_one_fingerprint() -> None:
    base = canonical_preference([1, 2, 3], TASKS)
    assert canonical_preference([10, 20, 30], TASKS).fingerprint == base.fingerprint
    assert canonical_preference([1 + 1e-13, 2, 3], TASKS).fingerprint == base.fingerprint
    assert canonical_preference([1.1, 2, 3], TASKS).fingerprint != base.fingerprint
    assert len(base.fingerprint) == 16


@pytest.mark.parametrize(
    ("value", "field", "match"),
    [
        ({"sms_spam": 1, "nope": 1}, "preference.nope", "unknown task"),
        ({"sms_spam": -0.1}, "preference.sms_spam", "non-negative"),
        ({"trec6": float("nan")}, "preference.trec6", "finite"),
        ({"trec6": float("inf")}, "preference.trec6", "finite"),
        ({"trec6": 10**400}, "preference.trec6", "at most"),
        ([1, 10**309, 1], "preference[1]", "at most"),
        ({"trec6": "1"}, "preference.trec6", "number"),
        ({"trec6": True}, "preference.trec6", "number"),
        ([1, 2], "preference", "expected 3 weights"),
        ([1, 2, 3, 4], "preference", "expected 3 weights"),
        ([1, -2, 3], "preference[1]", "non-negative"),
        ([1, None, 3], "preference[1]", "number"),
        ([0, 0, 0], "preference", "positive"),
        ({}, "preference", "positive"),
        ("0.5,0.5", "preference", "mapping"),
    ],
)
def test_invalid_preferences_name_the_offending_element(value, field, match) -> None:
    with pytest.raises(PreferenceError, match=match) as info:
        canonical_preference(value, TASKS)
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_snapping_keeps_the_sum_and_rounds_to_grid() -> None:
    assert snap((1 / 3, 1 / 3, 1 / 3), 10) == (0.4, 0.3, 0.3)
    assert snap((0.66, 0.34, 0.0), 4) == (0.75, 0.25, 0.0)
    for grid in (1, 3, 7, 20, 100):
        snapped = snap((0.123, 0.456, 0.421), grid)
        assert math.fsum(snapped) == pytest.approx(1.0)
        assert all(abs(round(w * grid) - w * grid) < 1e-9 for w in snapped)
    near = [canonical_preference([0.5 + eps, 0.5 - eps, 0], TASKS, grid=10) for eps in (0.0, 0.01, 0.04)]
    assert len({p.fingerprint for p in near}) == 1
    with pytest.raises(ValueError, match="grid"):
        snap((1.0,), 0)
