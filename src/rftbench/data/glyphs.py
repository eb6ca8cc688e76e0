"""Rendered character glyphs from the TrueType fonts that matplotlib ships (the `digits` suite's
pre-training data and its `typed` OOD digits).

Glyphs are rasterised with matplotlib's FreeType wrapper (`matplotlib.ft2font.FT2Font`) onto a
canvas twice the output size, with every font scaled to the same cap height (the height of "H",
`CAP_FRACTION` of the frame). A glyph is centred horizontally on its ink and sits on a common
baseline that centres capital letters and digits vertically, so lower-case letters keep their size
and position relative to capitals; a descender that would leave the frame is moved up into it and
a glyph wider than the frame (W, M of some bold or serif fonts) is shrunk to fit.
Augmentation works on the whole batch with torch and ends at the output size.
"""
from __future__ import annotations

import functools
import string
from pathlib import Path
from typing import Literal, Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.ft2font import FT2Font, LoadFlags

CHARSET = string.digits + string.ascii_uppercase + string.ascii_lowercase
CAP_FRACTION = 0.68
DEFAULT_HELD_OUT: tuple[str, ...] = ("DejaVuSansMono", "DejaVuSerif", "STIXGeneralBol", "cmr10")

Augment = bool | Literal["full", "mild", "none"]

STROKES = (-1, 0, 1, 2)  # stroke widths (see `_stroke`)
_SUPERSAMPLE = 2
_MARGIN = 1  # canvas pixels kept free at the frame border
_CHUNK = 2048  # samples augmented at once (bounds memory; fixed, so results do not depend on it)
_DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_GLYPH_NAMES = dict(zip(CHARSET, _DIGIT_NAMES + tuple(string.ascii_uppercase + string.ascii_lowercase)))


def _font_dir() -> Path:
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _has_charset(font: FT2Font) -> bool:
    """True when every CHARSET character maps to the glyph with its standard (Adobe) name.

    This rejects fonts without the characters (STIX size/non-Unicode variants, DejaVu*Display),
    fonts that map them to symbols (cmex10, cmsy10), the LastResort placeholder font and cmmi10,
    whose digits are old-style figures ("zerooldstyle", ...).
    """
    for char in CHARSET:
        index = font.get_char_index(ord(char))
        if index == 0 or font.get_glyph_name(index) != _GLYPH_NAMES[char]:
            return False
    return True


@functools.cache
def available_fonts() -> list[str]:
    """File stems of matplotlib's bundled TrueType fonts that render CHARSET as ordinary letters."""
    return sorted(p.stem for p in _font_dir().glob("*.ttf") if _has_charset(FT2Font(str(p))))


def _check_font(name: str) -> None:
    if name not in available_fonts():
        raise ValueError(f"unknown font {name!r}; available: {available_fonts()}")


def _rasterise(font: FT2Font, char: str) -> tuple[np.ndarray, float]:
    """(ink bitmap trimmed to its bounding box in [0, 1], height of its top above the baseline)."""
    font.set_text(char, 0.0, flags=LoadFlags.NO_HINTING)
    font.draw_glyphs_to_bitmap(antialiased=True)
    image = font.get_image().astype(np.float32) / 255.0
    rows, cols = np.nonzero(image.max(axis=1))[0], np.nonzero(image.max(axis=0))[0]
    top = font.load_char(ord(char), flags=LoadFlags.NO_HINTING).bbox[3] / 64.0
    return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], top


def _stroke(masks: torch.Tensor, width: int) -> torch.Tensor:
    """Change the stroke width of uint8 ink masks (..., H, W): -1 erodes by a 3x3 square, +1 dilates
    by 3x3, +2 by 5x5 (grey-level min / max filters over the pixels inside the image), 0 keeps them."""
    if width < 0:
        return 255 - _stroke(255 - masks, -width)
    for _ in range(width):  # 3x3 max filter, separably
        rows = masks.clone()
        torch.maximum(rows[..., :, 1:], masks[..., :, :-1], out=rows[..., :, 1:])
        torch.maximum(rows[..., :, :-1], masks[..., :, 1:], out=rows[..., :, :-1])
        masks = rows.clone()
        torch.maximum(masks[..., 1:, :], rows[..., :-1, :], out=masks[..., 1:, :])
        torch.maximum(masks[..., :-1, :], rows[..., 1:, :], out=masks[..., :-1, :])
    return masks


@functools.cache
def _glyph_bank(name: str, size: int) -> torch.Tensor:
    """Glyphs of one font on the 2*size canvas: (len(STROKES), len(CHARSET), 2*size, 2*size) uint8
    ink coverage (255 = full), one slice per stroke width; slice STROKES.index(0) is canonical."""
    canvas = _SUPERSAMPLE * size
    font = FT2Font(str(_font_dir() / f"{name}.ttf"))
    font.set_size(100.0, 72.0)
    cap_at_100 = font.load_char(ord("H"), flags=LoadFlags.NO_HINTING).bbox[3] / 64.0
    cap = CAP_FRACTION * canvas
    font.set_size(100.0 * cap / cap_at_100, 72.0)
    baseline = (canvas + cap) / 2.0
    room = canvas - 2 * _MARGIN
    bank = torch.zeros(len(CHARSET), canvas, canvas)
    for i, char in enumerate(CHARSET):
        ink, top = _rasterise(font, char)
        glyph = torch.from_numpy(ink)
        if max(glyph.shape) > room:  # a wide W or M of a bold or serif font: shrink it to fit
            scale = room / max(glyph.shape)
            shape = [max(1, round(s * scale)) for s in glyph.shape]
            glyph = F.interpolate(glyph[None, None], size=shape, mode="bilinear", antialias=True)[0, 0]
        h, w = glyph.shape
        y = min(max(round(baseline - top), _MARGIN), canvas - _MARGIN - h)
        x = (canvas - w) // 2
        bank[i, y : y + h, x : x + w] = glyph
    bank = (bank.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return torch.stack([_stroke(bank, width) for width in STROKES])


def _augment_level(augment: Augment) -> str:
    level = {True: "full", False: "none"}[augment] if isinstance(augment, bool) else augment
    if level not in ("full", "mild", "none"):
        raise ValueError(f"augment must be True, False, 'full', 'mild' or 'none', got {augment!r}")
    return level


def _uniform(g: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _affine(g: torch.Generator, n: int, rot_deg: float, scale: tuple[float, float], aspect: float,
            shear_deg: float, shift: float) -> torch.Tensor:
    """Inverse affine maps (n, 2, 3) for `F.affine_grid` (output -> input, normalised coordinates)."""
    angle = torch.deg2rad(_uniform(g, n, -rot_deg, rot_deg))
    s = _uniform(g, n, *scale)
    a = _uniform(g, n, -aspect, aspect)
    shear = torch.tan(torch.deg2rad(_uniform(g, n, -shear_deg, shear_deg)))
    t = _uniform(g, 2 * n, -2 * shift, 2 * shift).view(n, 2)  # frame spans 2 normalised units
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([cos, -sin, sin, cos], dim=1).view(n, 2, 2)
    shearing = torch.eye(2).repeat(n, 1, 1)
    shearing[:, 0, 1] = shear
    scaling = torch.diag_embed(torch.stack([s * (1 + a), s * (1 - a)], dim=1))
    inverse = torch.linalg.inv(rotation @ shearing @ scaling)
    return torch.cat([inverse, -(inverse @ t.unsqueeze(2))], dim=2)


def _blur(masks: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur (5 taps) of (n, 1, H, W); sigma 0 leaves a sample as is."""
    n, _, h, w = masks.shape
    x = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    out = F.conv2d(masks.view(1, n, h, w), kernel.view(n, 1, 1, 5), padding=(0, 2), groups=n)
    out = F.conv2d(out, kernel.view(n, 1, 5, 1), padding=(2, 0), groups=n)
    return out.view(n, 1, h, w)


def _colours(g: torch.Generator, n: int, min_contrast: float,
             chroma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (ink, background) RGB colours (n, 3) whose channel means differ by >= min_contrast.

    The two grey levels are drawn first, then each gets a zero-mean colour offset scaled so that
    no channel leaves [0, 1], which keeps the channel mean (and so the contrast) exact.
    """
    low = _uniform(g, n, 0.0, 1.0 - min_contrast)
    high = low + min_contrast + (1.0 - min_contrast - low) * torch.rand(n, generator=g)
    light_ink = torch.rand(n, generator=g) < 0.5
    grey = torch.stack([torch.where(light_ink, high, low), torch.where(light_ink, low, high)])  # (2, n)
    offset = _uniform(g, 2 * n * 3, -chroma, chroma).view(2, n, 3)
    offset = offset - offset.mean(dim=2, keepdim=True)
    room = torch.minimum(grey, 1.0 - grey)
    largest = offset.abs().amax(dim=2).clamp_min(1e-12)
    colour = grey[..., None] + offset * torch.clamp(room / largest, max=1.0)[..., None]
    colour = colour.clamp(0.0, 1.0)  # rounding only
    return colour[0], colour[1]


def _augment(bases: torch.Tensor, level: str, size: int, g: torch.Generator) -> torch.Tensor:
    """Augment glyphs (n, 1, 2*size, 2*size) uint8 into images (n, 3, size, size) float32."""
    n = bases.shape[0]
    if level == "full":
        theta = _affine(g, n, rot_deg=15.0, scale=(0.75, 1.1), aspect=0.1, shear_deg=10.0, shift=0.1)
        sigma = torch.where(torch.rand(n, generator=g) < 0.3, _uniform(g, n, 0.3, 1.0), torch.zeros(n))
        ink, background = _colours(g, n, min_contrast=0.35, chroma=0.25)
        noise_std = _uniform(g, n, 0.0, 0.06)
    else:
        theta = _affine(g, n, rot_deg=5.0, scale=(0.9, 1.05), aspect=0.0, shear_deg=0.0, shift=0.05)
    out = torch.empty(n, 3, size, size)
    for start in range(0, n, _CHUNK):
        part = slice(start, start + _CHUNK)
        masks = bases[part].float().div_(255.0)
        grid = F.affine_grid(theta[part], [masks.shape[0], 1, size, size], align_corners=False)
        masks = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if level == "mild":
            out[part] = masks.clamp(0.0, 1.0).expand(-1, 3, -1, -1)
            continue
        masks = _blur(masks, sigma[part]).clamp(0.0, 1.0)
        fg, bg = ink[part, :, None, None], background[part, :, None, None]
        image = bg + (fg - bg) * masks
        noise = torch.randn(image.shape, generator=g) * noise_std[part, None, None, None]
        out[part] = (image + noise).clamp(0.0, 1.0)
    return out


def render(chars: str, fonts: Sequence[str], n: int, size: int = 32, seed: int = 0,
           augment: Augment = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` glyph images (n, 3, size, size) float32 in [0, 1] and int64 labels (n,).

    Each sample's character and font are drawn uniformly from `chars` (a string of distinct CHARSET
    characters) and `fonts` (names from `available_fonts()`); a label is the character's index in
    `chars` (so for `chars=CHARSET` it is the CHARSET index and digit d has label d). The result is
    a deterministic function of the arguments.

    augment: False / "none" gives clean centred white-on-black glyphs (the canonical rendering);
    "mild" adds small jitter of position, scale, rotation and stroke width and stays white on black
    (the `typed` OOD digits); True / "full" (pre-training) applies a random affine map (rotation
    +-15 deg, scale 0.75-1.1, aspect +-10%, shear +-10 deg, shift +-10% of the frame), stroke
    erosion or dilation (-0.5 to +1 output pixel per side), random ink/background colours whose
    channel means differ by at least 0.35 (light or dark ink, equally often), a mild blur for 30%
    of samples and Gaussian noise (std up to 0.06). Glyph images are cached per (font, size).
    """
    level = _augment_level(augment)
    if not chars or len(set(chars)) != len(chars) or not set(chars) <= set(CHARSET):
        raise ValueError(f"chars must be distinct characters of CHARSET, got {chars!r}")
    if not fonts:
        raise ValueError("fonts must not be empty")
    for name in fonts:
        _check_font(name)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(chars), (n,), generator=g)
    font_index = torch.randint(len(fonts), (n,), generator=g)
    charset_index = torch.tensor([CHARSET.index(c) for c in chars])[labels]
    low, high = {"none": (0, 0), "mild": (0, 1), "full": (-1, 2)}[level]
    stroke_index = torch.randint(low, high + 1, (n,), generator=g) - STROKES[0]
    bases = torch.empty(n, 1, _SUPERSAMPLE * size, _SUPERSAMPLE * size, dtype=torch.uint8)
    for j, name in enumerate(fonts):
        picked = font_index == j
        bases[picked, 0] = _glyph_bank(name, size)[stroke_index[picked], charset_index[picked]]
    if level == "none":
        images = F.avg_pool2d(bases.float().div_(255.0), _SUPERSAMPLE).expand(-1, 3, -1, -1).contiguous()
    else:
        images = _augment(bases, level, size, g)
    return images, labels
