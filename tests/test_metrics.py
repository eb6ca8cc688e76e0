"""Tests of rftbench.metrics against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rftbench.metrics import (
    ALEXNET_CLEAN_ERROR,
    ALEXNET_ERRORS,
    CORRUPTIONS,
    accuracy,
    ece,
    effective_robustness,
    mce,
    nll,
    relative_mce,
)


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_accuracy_from_logits_and_predictions():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert accuracy(np.array([0, 1, 1, 1]), np.array([0, 1, 0, 1])) == 0.75


PROBS = torch.tensor([
    [0.90, 0.05, 0.05],  # confidence 0.90, correct
    [0.90, 0.05, 0.05],  # confidence 0.90, wrong
    [0.10, 0.62, 0.28],  # confidence 0.62, correct
    [0.20, 0.18, 0.62],  # confidence 0.62, correct
], dtype=torch.float64)
PROBS_LABELS = torch.tensor([0, 1, 1, 2])


def test_ece_known_value():
    # bin (13/15, 14/15]: |0.5 - 0.90| * 2/4 = 0.20; bin (9/15, 10/15]: |1.0 - 0.62| * 2/4 = 0.19
    assert ece(PROBS, PROBS_LABELS) == pytest.approx(0.39)
    assert ece(PROBS.log(), PROBS_LABELS) == pytest.approx(0.39)  # logits give softmax = PROBS
    assert ece(PROBS.numpy(), PROBS_LABELS.numpy(), logits=False) == pytest.approx(0.39)
    assert ece(PROBS, PROBS_LABELS, logits=True) != pytest.approx(0.39)
    # one bin of width 1: |0.75 - mean confidence 0.76|
    assert ece(PROBS, PROBS_LABELS, n_bins=1) == pytest.approx(abs(0.75 - 0.76))


def test_ece_zero_when_calibrated():
    probs = torch.tensor([[0.7, 0.3]] * 10, dtype=torch.float64)
    labels = torch.tensor([0] * 7 + [1] * 3)
    assert ece(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert ece(torch.eye(3), torch.arange(3)) == pytest.approx(0.0, abs=1e-12)  # confidence 1: last bin


def test_nll_known_value():
    assert nll(torch.zeros(5, 4), torch.arange(5) % 4) == pytest.approx(math.log(4))
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    assert nll(logits, torch.tensor([0, 1])) == pytest.approx((-math.log(0.75) + math.log(2)) / 2)


def test_alexnet_constants():
    assert CORRUPTIONS == tuple(ALEXNET_ERRORS) and len(CORRUPTIONS) == 15
    # the per-corruption means are the AlexNet errors the ImageNet-C repository lists
    published = [0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360, 0.866816, 0.826572,
                 0.819324, 0.564592, 0.853204, 0.646056, 0.717840, 0.606500]
    assert [np.mean(ALEXNET_ERRORS[c]) for c in CORRUPTIONS] == pytest.approx(published, abs=1e-9)
    assert ALEXNET_CLEAN_ERROR == pytest.approx(1 - 0.56522)
    assert mce(ALEXNET_ERRORS) == pytest.approx(1.0)
    assert relative_mce(ALEXNET_ERRORS, ALEXNET_CLEAN_ERROR) == pytest.approx(1.0)
    assert mce({c: [e / 2 for e in v] for c, v in ALEXNET_ERRORS.items()}) == pytest.approx(0.5)


BASELINE = {"a": [0.5] * 5, "b": [0.2, 0.4, 0.6, 0.8, 1.0]}  # sums 2.5 and 3.0
ERRORS = {"a": [0.25] * 5, "b": [0.6] * 5}  # sums 1.25 and 3.0


def test_mce_hand_computed():
    # CE_a = 1.25 / 2.5 = 0.5, CE_b = 3.0 / 3.0 = 1.0
    assert mce(ERRORS, BASELINE) == pytest.approx(0.75)


def test_relative_mce_hand_computed():
    # rel CE_a = (1.25 - 5*0.1) / (2.5 - 5*0.2) = 0.5; rel CE_b = (3.0 - 0.5) / (3.0 - 1.0) = 1.25
    assert relative_mce(ERRORS, 0.1, BASELINE, 0.2) == pytest.approx(0.875)


def test_mce_rejects_incomplete_errors():
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        mce({"a": [0.1] * 5}, BASELINE)
    with pytest.raises(ValueError, match="4 severities"):
        mce({"a": [0.1] * 5, "b": [0.1] * 4}, BASELINE)
    with pytest.raises(ValueError, match="unknown"):
        mce({**ALEXNET_ERRORS, "speckle_noise": [0.5] * 5})


def test_effective_robustness_exact_line():
    # baseline on logit(ood) = 0.5 * logit(id) - 1
    baseline_id = [sigmoid(x) for x in (-1.0, 0.0, 1.0)]
    baseline_ood = [sigmoid(0.5 * x - 1) for x in (-1.0, 0.0, 1.0)]
    er, fit = effective_robustness(sigmoid(2.0), 0.6, baseline_id, baseline_ood)
    assert (fit.slope, fit.intercept, fit.n) == (pytest.approx(0.5), pytest.approx(-1.0), 3)
    assert er == pytest.approx(0.6 - sigmoid(0.0))


def test_effective_robustness_least_squares():
    # logit points (x, y) = (-1, 0), (0, 1), (1, 1): slope = sum(xy)/sum(x^2) = 0.5, intercept = mean(y) = 2/3
    baseline_id = [sigmoid(-1.0), 0.5, sigmoid(1.0)]
    baseline_ood = [0.5, sigmoid(1.0), sigmoid(1.0)]
    er, fit = effective_robustness(np.array([sigmoid(1.0), 0.5]), np.array([0.7, 0.7]), baseline_id, baseline_ood)
    assert (fit.slope, fit.intercept) == (pytest.approx(0.5), pytest.approx(2 / 3))
    assert er == pytest.approx([0.7 - sigmoid(7 / 6), 0.7 - sigmoid(2 / 3)])


def test_effective_robustness_clips_and_validates():
    er, fit = effective_robustness(1.0, 1.0, [0.5, sigmoid(1.0)], [0.5, sigmoid(1.0)])  # identity fit
    assert (fit.slope, fit.intercept) == (pytest.approx(1.0), pytest.approx(0.0, abs=1e-12))
    assert er == pytest.approx(1.0 - 0.999)  # id accuracy 1 is clipped to 1 - 1e-3
    assert logit(fit.predict(0.3)) == pytest.approx(logit(0.3))
    with pytest.raises(ValueError, match="at least 2 baseline points"):
        effective_robustness(0.5, 0.5, [0.6], [0.4])
    with pytest.raises(ValueError, match="all equal"):
        effective_robustness(0.5, 0.5, [0.6, 0.6], [0.4, 0.5])
