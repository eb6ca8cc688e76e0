"""Evaluation metrics: accuracy, calibration (ECE, NLL), ImageNet-C mCE, effective robustness.

Accuracies and errors are fractions in [0, 1]; mCE values are ratios (1.0 = AlexNet; multiply by
100 for the percentages papers report).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from rftbench.data.corruptions import CORRUPTIONS  # noqa: F401  (the one list; ALEXNET_ERRORS follows its order)

# AlexNet (torchvision weights) top-1 error on ImageNet-C, per corruption and severity 1..5, over
# all 50,000 images of each split (Hendrycks & Dietterich, ICLR 2019; the per-corruption means are
# the AlexNet errors listed by the ImageNet-C repository, github.com/hendrycks/robustness).
ALEXNET_ERRORS: dict[str, tuple[float, float, float, float, float]] = {
    "gaussian_noise": (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
    "shot_noise": (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
    "impulse_noise": (0.78374, 0.89808, 0.94870, 0.98720, 0.99548),
    "defocus_blur": (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
    "glass_blur": (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
    "motion_blur": (0.58430, 0.70048, 0.82108, 0.89750, 0.92638),
    "zoom_blur": (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
    "snow": (0.71726, 0.88392, 0.86468, 0.91870, 0.94952),
    "frost": (0.61390, 0.79734, 0.88790, 0.89942, 0.93430),
    "fog": (0.67474, 0.76050, 0.84378, 0.87260, 0.94500),
    "brightness": (0.45140, 0.48502, 0.54048, 0.62166, 0.72440),
    "contrast": (0.64548, 0.76150, 0.88874, 0.97760, 0.99270),
    "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
    "pixelate": (0.52218, 0.54620, 0.73728, 0.87092, 0.91262),
    "jpeg_compression": (0.51002, 0.54718, 0.57294, 0.65458, 0.74778),
}
# Clean ImageNet-val top-1 error of the same AlexNet weights (torchvision acc@1 56.522%; the paper
# reports 43.5%).
ALEXNET_CLEAN_ERROR = 0.43478


def _float64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu().double()


def accuracy(logits, labels) -> float:
    """Top-1 accuracy from logits (N, K) or predicted labels (N,)."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    predictions = logits.argmax(1) if logits.ndim == 2 else logits
    return (predictions.cpu() == labels.cpu()).double().mean().item()


def _probabilities(probs_or_logits, logits: bool | None) -> torch.Tensor:
    x = _float64(probs_or_logits)
    if logits is None:  # a probability matrix: entries in [0, 1], rows summing to 1
        logits = not (x.min() >= 0 and x.max() <= 1 and torch.allclose(x.sum(1), torch.ones(len(x), dtype=x.dtype), atol=1e-5))
    return x.softmax(1) if logits else x


def ece(probs_or_logits, labels, n_bins: int = 15, logits: bool | None = None) -> float:
    """Expected calibration error: top-label confidence, `n_bins` equal-width bins (lo, hi].

    ECE = sum over bins of |accuracy - mean confidence| * (bin count / N). Inputs are logits or
    probabilities (N, K); `logits=None` treats rows that are probability distributions as such.
    """
    probs = _probabilities(probs_or_logits, logits)
    labels = torch.as_tensor(labels).cpu()
    confidence, prediction = probs.max(1)
    correct = (prediction == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    bins = (torch.bucketize(confidence, edges) - 1).clamp(min=0)  # bin b holds edges[b] < conf <= edges[b+1]
    total = 0.0
    for b in bins.unique():
        members = bins == b
        total += (correct[members].mean() - confidence[members].mean()).abs().item() * members.double().mean().item()
    return total


def nll(logits, labels) -> float:
    """Mean negative log-likelihood (natural log) of the labels under softmax(logits)."""
    log_probs = _float64(logits).log_softmax(1)
    labels = torch.as_tensor(labels).cpu().long()
    return -log_probs[torch.arange(len(labels)), labels].mean().item()


def _check_errors(errors: Mapping[str, Sequence[float]], baseline: Mapping[str, Sequence[float]]) -> None:
    if set(errors) != set(baseline):
        missing, extra = sorted(set(baseline) - set(errors)), sorted(set(errors) - set(baseline))
        raise ValueError(f"errors must cover exactly the baseline's corruptions; missing {missing}, unknown {extra}")
    for corruption, values in errors.items():
        if len(values) != len(baseline[corruption]):
            raise ValueError(f"{corruption}: {len(values)} severities given, the baseline has {len(baseline[corruption])}")


def mce(errors: Mapping[str, Sequence[float]], baseline: Mapping[str, Sequence[float]] = ALEXNET_ERRORS) -> float:
    """Mean corruption error: mean over corruptions c of sum_s E[s,c] / sum_s E_baseline[s,c]."""
    _check_errors(errors, baseline)
    return float(np.mean([np.sum(errors[c]) / np.sum(baseline[c]) for c in baseline]))


def relative_mce(
    errors: Mapping[str, Sequence[float]],
    clean_error: float,
    baseline_errors: Mapping[str, Sequence[float]] = ALEXNET_ERRORS,
    baseline_clean_error: float = ALEXNET_CLEAN_ERROR,
) -> float:
    """Relative mCE: mean over c of sum_s (E[s,c] - E_clean) / sum_s (E_base[s,c] - E_base_clean)."""
    _check_errors(errors, baseline_errors)
    return float(np.mean([
        np.sum(np.asarray(errors[c]) - clean_error) / np.sum(np.asarray(baseline_errors[c]) - baseline_clean_error)
        for c in baseline_errors
    ]))


def ood_groups(splits: Iterable[tuple[str, str, str | None, float]]) -> dict[str, float]:
    """The individual OOD results of a headline from (split, shift, corruption, accuracy) of the
    OOD splits: every non-corruption split by itself (e.g. each domain), every corruption as the mean
    over its severities (key `corruption/<name>`). `ood_worst_acc` is the minimum of these."""
    groups: dict[str, list[float]] = {}
    for split, shift, corruption, acc in splits:
        key = f"corruption/{corruption}" if shift == "corruption" and isinstance(corruption, str) else split
        groups.setdefault(key, []).append(float(acc))
    return {k: float(np.mean(v)) for k, v in groups.items()}


def _logit(p, clip: float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), clip, 1 - clip)
    return np.log(p) - np.log1p(-p)


class LogitFit(NamedTuple):
    """logit(OOD accuracy) = slope * logit(ID accuracy) + intercept, fitted on `n` baseline points."""

    slope: float
    intercept: float
    n: int
    clip: float

    def predict(self, id_acc):
        """The OOD accuracy the fit predicts for `id_acc`."""
        z = self.slope * _logit(id_acc, self.clip) + self.intercept
        return 1 / (1 + np.exp(-z))


def effective_robustness(id_acc, ood_acc, baseline_id: Sequence[float], baseline_ood: Sequence[float],
                         clip: float = 1e-3) -> tuple[float | np.ndarray, LogitFit]:
    """Effective robustness (Taori et al. 2020): OOD accuracy minus the baseline fit's prediction.

    The fit is least squares of logit(OOD acc) on logit(ID acc) over the baseline points;
    accuracies are clipped to [clip, 1 - clip] before the logit. Returns (er, fit).
    """
    baseline_id, baseline_ood = np.asarray(baseline_id, dtype=np.float64), np.asarray(baseline_ood, dtype=np.float64)
    if baseline_id.shape != baseline_ood.shape or baseline_id.ndim != 1:
        raise ValueError("baseline_id and baseline_ood must be 1-D and of equal length")
    if len(baseline_id) < 2:
        raise ValueError(f"effective robustness needs at least 2 baseline points, got {len(baseline_id)}")
    x = _logit(baseline_id, clip)
    if np.ptp(x) == 0:
        raise ValueError("the baseline ID accuracies are all equal; the linear fit is undefined")
    slope, intercept = np.polyfit(x, _logit(baseline_ood, clip), 1)
    fit = LogitFit(float(slope), float(intercept), len(baseline_id), clip)
    er = np.asarray(ood_acc, dtype=np.float64) - fit.predict(id_acc)
    return (float(er) if er.ndim == 0 else er), fit
