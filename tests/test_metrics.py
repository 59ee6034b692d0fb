"""Metrics on constructed cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from fv_serving.metrics import UnlearningMetrics, mia_efficacy


def _confidences(rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    members = rng.uniform(0.95, 1.0, 2000)  # training data: confident
    nonmembers = rng.uniform(0.05, 0.6, 1500)  # unseen data: not
    return members, nonmembers


def test_mia_calls_member_like_forget_set_members() -> None:
    members, nonmembers = _confidences(np.random.RandomState(0))
    forget = np.random.RandomState(1).uniform(0.96, 1.0, 500)
    assert mia_efficacy(members, nonmembers, forget) == pytest.approx(0.0, abs=0.5)


def test_mia_calls_unseen_like_forget_set_nonmembers() -> None:
    members, nonmembers = _confidences(np.random.RandomState(0))
    forget = np.random.RandomState(1).uniform(0.1, 0.5, 500)
    assert mia_efficacy(members, nonmembers, forget) == pytest.approx(100.0, abs=0.5)


def test_mia_counts_the_fraction() -> None:
    members, nonmembers = _confidences(np.random.RandomState(0))
    rng = np.random.RandomState(2)
    forget = np.concatenate([rng.uniform(0.1, 0.5, 300), rng.uniform(0.97, 1.0, 700)])
    assert mia_efficacy(members, nonmembers, forget) == pytest.approx(30.0, abs=1.0)


def test_mia_shadow_sets_are_balanced() -> None:
    """5000 members against 100 non-members, overlapping on [0.3, 0.7]: balanced shadow sets put the boundary
    near 0.5, so about half of a forget set spread over the overlap is called non-member. An attack fitted on
    all 5000 members would call nearly all of it a member."""
    rng = np.random.RandomState(0)
    members, nonmembers = rng.uniform(0.3, 1.0, 5000), rng.uniform(0.0, 0.7, 100)
    forget = np.random.RandomState(1).uniform(0.3, 0.7, 1000)
    assert 25.0 <= mia_efficacy(members, nonmembers, forget) <= 75.0


def test_mia_shadow_sets_follow_the_seed() -> None:
    rng = np.random.RandomState(0)
    members, nonmembers = rng.uniform(0.3, 1.0, 3000), rng.uniform(0.0, 0.7, 60)
    forget = np.linspace(0.3, 0.7, 400)
    results = {mia_efficacy(members, nonmembers, forget, seed=s) for s in range(5)}
    assert len(results) > 1  # other shadow subsets, other boundaries
    assert mia_efficacy(members, nonmembers, forget, seed=3) == mia_efficacy(members, nonmembers, forget, seed=3)


def test_mia_refuses_empty_sets() -> None:
    with pytest.raises(ValueError):
        mia_efficacy(np.ones(10), np.zeros(0), np.ones(3))


def test_avg_gap() -> None:
    method = UnlearningMetrics(UA=10.0, RA=90.0, TA=85.0, MIA=20.0)
    retrain = UnlearningMetrics(UA=8.0, RA=94.0, TA=85.0, MIA=30.0)
    assert method.avg_gap(retrain) == pytest.approx((2 + 4 + 0 + 10) / 4)
