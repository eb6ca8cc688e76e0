"""The one place where a best candidate (epoch, beta, coefficient, alpha, variant) is picked from
validation scores.

The rule, everywhere: **the highest score wins; among equal scores, the candidate that comes first
in the caller's order wins.** Callers list their candidates from the most conservative to the least:

- epochs: in training order (ties -> the earlier epoch);
- CT betas: descending, 1.0 (ReLU, the model as is) first (ties -> the larger beta);
- WiSE-FT alphas: ascending (ties -> the smaller alpha, closer to the start model);
- RWS coefficients: by magnitude, then value (ties -> the least change to the patched model);
- leaderboard variants: more trial seeds first, then the variant id.

A NaN score (or None) never wins over a number; if every score is NaN the first candidate wins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Generic, Sequence, TypeVar

T = TypeVar("T")


def _key(score: float | None) -> float:
    return -math.inf if score is None or math.isnan(score) else float(score)


def best_index(scores: Sequence[float | None]) -> int:
    """Index of the best score under the rule above (the first of the highest)."""
    if len(scores) == 0:
        raise ValueError("nothing to select from: no candidates")
    best = 0
    for i in range(1, len(scores)):
        if _key(scores[i]) > _key(scores[best]):
            best = i
    return best


def select(candidates: Sequence[T], scores: Sequence[float | None]) -> T:
    """The candidate with the highest score; ties -> the first in `candidates` (list them from the
    most conservative to the least)."""
    if len(candidates) != len(scores):
        raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
    return candidates[best_index(scores)]


@dataclass
class Running(Generic[T]):
    """The same rule for candidates that arrive one at a time, in the caller's order (e.g. epochs):
    `offer` keeps a candidate only if its score is strictly higher than the best so far."""

    candidate: T | None = None
    score: float = -math.inf
    payload: Any = field(default=None, repr=False)
    seen: int = 0

    def offer(self, candidate: T, score: float | None, payload: Any = None) -> bool:
        """Consider `candidate`; True when it is the new best (its `payload`, e.g. a state copy, is kept)."""
        self.seen += 1
        if self.seen == 1 or _key(score) > _key(self.score):
            self.candidate, self.score, self.payload = candidate, _key(score), payload
            return True
        return False
