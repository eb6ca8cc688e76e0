"""Progress bars for long steps: the one place that decides whether they are shown.

`bar(iterable, desc)` wraps tqdm: a bar appears only for steps over about 2 s (`delay`), on a
terminal (stderr is a TTY), and never when `RFTBENCH_PROGRESS=0`; `RFTBENCH_PROGRESS=1` forces bars
(e.g. into a sweep worker's log, which is not a terminal and so gets none by default).
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")
ENV = "RFTBENCH_PROGRESS"
DELAY_S = 2.0


def enabled() -> bool:
    """`RFTBENCH_PROGRESS` (0/false/no/off: never; anything else: always) or, unset, stderr is a terminal."""
    value = os.environ.get(ENV)
    if value is not None and value.strip() != "":
        return value.strip().lower() not in ("0", "false", "no", "off")
    return sys.stderr.isatty()


def bar(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """`iterable` with a progress bar labelled `desc` when `enabled()`; the iterable itself otherwise."""
    if not enabled():
        return iterable
    return tqdm(iterable, desc=desc, total=total, unit=unit, delay=DELAY_S, leave=False, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)
