"""One look per method, kept across every plot: a colour from the Okabe-Ito colour-blind-safe
palette and a marker, the pair distinct for every method (the markers alone are distinct for the
built-in methods). Methods not listed get a stable pair derived from their name."""
from __future__ import annotations

from typing import NamedTuple

from rftbench.utils import stable_hash

# Okabe & Ito (2008), "Color Universal Design": distinguishable under the common colour deficiencies
OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73",
             "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7",
             "grey": "#999999"}
EDGE = "#222222"  # every marker is outlined, so light colours (yellow) and overlaps stay visible


class Style(NamedTuple):
    color: str
    marker: str


METHODS: dict[str, Style] = {
    "zeroshot": Style(OKABE_ITO["grey"], "X"),
    "lp": Style(OKABE_ITO["sky"], "v"),
    "ft": Style(OKABE_ITO["black"], "o"),
    "lpft": Style(OKABE_ITO["blue"], "^"),
    "wise": Style(OKABE_ITO["orange"], "D"),
    "lora": Style(OKABE_ITO["purple"], "P"),
    "ct": Style(OKABE_ITO["vermillion"], "s"),
    "ct_trainable": Style(OKABE_ITO["vermillion"], "p"),
    "ct_robust": Style(OKABE_ITO["vermillion"], "h"),
    "ftp": Style(OKABE_ITO["green"], "<"),
    "rws": Style(OKABE_ITO["yellow"], "*"),
    "levi": Style(OKABE_ITO["green"], ">"),
}
_EXTRA_MARKERS = "d8H"


def method_style(method: str) -> Style:
    """The method's colour and marker (fixed for the built-in methods, stable for any other name)."""
    if method in METHODS:
        return METHODS[method]
    colors = list(OKABE_ITO.values())
    h = int(stable_hash(method, length=8), 16)
    return Style(colors[h % len(colors)], _EXTRA_MARKERS[(h // len(colors)) % len(_EXTRA_MARKERS)])


def series_color(i: int) -> str:
    """The i-th colour for series that are not methods (e.g. corruptions), from the same palette."""
    order = ["blue", "vermillion", "green", "orange", "purple", "sky", "black", "grey", "yellow"]
    return OKABE_ITO[order[i % len(order)]]
