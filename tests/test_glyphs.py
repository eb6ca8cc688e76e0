import string

import pytest
import torch
import torch.nn.functional as F

from rftbench.data import glyphs
from rftbench.data.glyphs import CHARSET, DEFAULT_HELD_OUT, available_fonts, render


def test_charset_and_labels_of_digits():
    assert CHARSET == string.digits + string.ascii_uppercase + string.ascii_lowercase
    assert len(CHARSET) == 62
    assert all(CHARSET.index(str(d)) == d for d in range(10))


def test_available_fonts_exclude_symbol_and_placeholder_fonts():
    fonts = available_fonts()
    assert fonts == sorted(fonts)
    for name in ("DejaVuSans", "DejaVuSerif-Bold", "DejaVuSansMono", "STIXGeneral", "cmr10", "cmtt10"):
        assert name in fonts
    for name in ("cmex10", "cmsy10", "cmmi10", "LastResortHE-Regular", "STIXSizOneSymReg",
                 "STIXNonUni", "DejaVuSansDisplay"):
        assert name not in fonts


def test_held_out_fonts_are_distinct_available_fonts():
    assert len(DEFAULT_HELD_OUT) == 4
    assert len(set(DEFAULT_HELD_OUT)) == 4
    assert set(DEFAULT_HELD_OUT) <= set(available_fonts())
    assert len(available_fonts()) - len(DEFAULT_HELD_OUT) >= 12  # enough fonts left for pre-training


@pytest.mark.parametrize("font", available_fonts())
def test_every_font_renders_every_character_inside_the_frame(font):
    canvas = 64
    banks = glyphs._glyph_bank(font, 32)
    assert banks.shape == (len(glyphs.STROKES), 62, canvas, canvas) and banks.dtype == torch.uint8
    bank = banks[glyphs.STROKES.index(0)].float() / 255
    assert (bank.flatten(1).sum(1) > 5).all()  # every glyph has ink
    assert len({g.numpy().tobytes() for g in bank}) == 62  # and they all differ
    border = torch.ones(canvas, canvas, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert bank[:, border].max() == 0  # a 1-pixel margin stays empty
    rows = torch.nonzero(bank[CHARSET.index("H")].amax(1)).flatten()
    cols = torch.nonzero(bank[CHARSET.index("H")].amax(0)).flatten()
    height = rows[-1] - rows[0] + 1
    assert abs(height - glyphs.CAP_FRACTION * canvas) <= 2  # every font at the same cap height
    assert abs((rows[0] + rows[-1] + 1) / 2 - canvas / 2) <= 1.5  # capitals centred vertically
    assert abs((cols[0] + cols[-1] + 1) / 2 - canvas / 2) <= 1  # and horizontally
    ink = banks.flatten(2).float().sum(2)  # thinner to thicker strokes: strictly more ink
    assert (ink[:-1] < ink[1:]).all()


@pytest.mark.parametrize("augment", [False, "mild", True])
def test_render_shapes_dtypes_and_range(augment):
    images, labels = render("0123456789", ["DejaVuSans", "cmr10"], 40, size=32, seed=3, augment=augment)
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (40,) and labels.dtype == torch.int64
    assert images.min() >= 0 and images.max() <= 1
    assert labels.min() >= 0 and labels.max() <= 9


@pytest.mark.parametrize("augment", [False, "mild", True])
def test_render_is_deterministic_and_seeded(augment):
    a = render(CHARSET, available_fonts(), 64, seed=7, augment=augment)
    b = render(CHARSET, available_fonts(), 64, seed=7, augment=augment)
    c = render(CHARSET, available_fonts(), 64, seed=8, augment=augment)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_labels_index_into_chars_and_clean_images_are_the_canonical_glyphs():
    chars = "zA7"
    images, labels = render(chars, ["DejaVuSerif"], 30, seed=1, augment=False)
    bank = glyphs._glyph_bank("DejaVuSerif", 32)[glyphs.STROKES.index(0)].float() / 255
    for image, label in zip(images, labels):
        expected = F.avg_pool2d(bank[CHARSET.index(chars[label])][None], 2)[0]
        for channel in image:  # white ink on black, grey in all three channels
            torch.testing.assert_close(channel, expected, rtol=0, atol=1e-6)
    assert set(labels.tolist()) == {0, 1, 2}


def test_sizes_other_than_32():
    images, _ = render("AB", ["cmtt10"], 4, size=48, seed=0, augment=True)
    assert images.shape == (4, 3, 48, 48)


def test_mild_augmentation_is_white_on_black_and_differs_from_clean():
    mild, labels = render("0123456789", DEFAULT_HELD_OUT, 50, seed=2, augment="mild")
    clean, clean_labels = render("0123456789", DEFAULT_HELD_OUT, 50, seed=2, augment=False)
    assert torch.equal(labels, clean_labels)  # same draws of characters and fonts
    assert torch.equal(mild[:, 0], mild[:, 1]) and torch.equal(mild[:, 0], mild[:, 2])
    assert mild[:, :, 0, 0].max() == 0  # background stays black
    assert (mild.flatten(1).amax(1) > 0.9).all()  # ink stays white
    assert not torch.equal(mild, clean)


def test_full_augmentation_uses_colour_and_both_polarities():
    images, _ = render(CHARSET, available_fonts(), 200, seed=4, augment=True)
    assert (images[:, 0] - images[:, 1]).abs().amax() > 0.1  # not grey
    corner = images[:, :, :2, :2].mean(dim=(1, 2, 3))
    assert (corner < 0.4).sum() > 20 and (corner > 0.6).sum() > 20  # dark and light backgrounds


def test_colours_keep_the_minimum_contrast_and_stay_in_range():
    g = torch.Generator().manual_seed(0)
    ink, background = glyphs._colours(g, 5000, min_contrast=0.35, chroma=0.25)
    assert ink.min() >= 0 and ink.max() <= 1 and background.min() >= 0 and background.max() <= 1
    contrast = (ink.mean(1) - background.mean(1)).abs()
    assert contrast.min() >= 0.35 - 1e-6
    assert (ink.mean(1) > background.mean(1)).float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_identity_affine_sampling_equals_area_downsampling():
    g = torch.Generator().manual_seed(0)
    theta = glyphs._affine(g, 3, rot_deg=0.0, scale=(1.0, 1.0), aspect=0.0, shear_deg=0.0, shift=0.0)
    torch.testing.assert_close(theta, torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(3, 2, 3))
    x = torch.rand(3, 1, 16, 16, generator=g)
    grid = F.affine_grid(theta, [3, 1, 8, 8], align_corners=False)
    sampled = F.grid_sample(x, grid, mode="bilinear", align_corners=False)
    torch.testing.assert_close(sampled, F.avg_pool2d(x, 2), rtol=0, atol=1e-6)


def test_affine_scale_and_rotation_are_inverted_for_sampling():
    g = torch.Generator().manual_seed(0)
    theta = glyphs._affine(g, 100, rot_deg=15.0, scale=(0.75, 1.1), aspect=0.0, shear_deg=0.0, shift=0.0)
    forward = torch.linalg.inv(theta[:, :, :2])
    scale = forward.det().sqrt()  # isotropic scale of the forward (glyph) transform
    assert scale.min() >= 0.75 - 1e-5 and scale.max() <= 1.1 + 1e-5
    angle = torch.rad2deg(torch.atan2(forward[:, 1, 0], forward[:, 0, 0]))
    assert angle.abs().max() <= 15 + 1e-4
    torch.testing.assert_close(theta[:, :, 2], torch.zeros(100, 2))


def test_stroke_erodes_and_dilates_by_squares_like_min_and_max_filters():
    dot = torch.zeros(9, 9, dtype=torch.uint8)
    dot[4, 4] = 255
    square = torch.zeros(9, 9, dtype=torch.uint8)
    square[3:6, 3:6] = 255
    assert torch.equal(glyphs._stroke(square, -1), dot)
    assert torch.equal(glyphs._stroke(dot, 0), dot)
    assert torch.equal(glyphs._stroke(dot, 1), square)
    assert glyphs._stroke(dot, 2).sum() == 25 * 255 and glyphs._stroke(dot, 2)[2:7, 2:7].min() == 255
    x = torch.randint(0, 256, (2, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    as_float = x.float()[:, None]
    assert torch.equal(glyphs._stroke(x, 1).float(), F.max_pool2d(as_float, 3, 1, 1)[:, 0])
    assert torch.equal(glyphs._stroke(x, -1).float(), -F.max_pool2d(-as_float, 3, 1, 1)[:, 0])


def test_blur_keeps_mass_and_sigma_zero_is_identity():
    x = torch.zeros(2, 1, 9, 9)
    x[:, :, 4, 4] = 1.0
    out = glyphs._blur(x, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out[0], x[0])
    assert out[1].sum().item() == pytest.approx(1.0, abs=1e-6)
    assert out[1, 0, 4, 4] < 0.2
    torch.testing.assert_close(out[1, 0], out[1, 0].T)  # isotropic


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="unknown font"):
        render("0", ["cmex10"], 1)
    with pytest.raises(ValueError, match="chars"):
        render("0!", ["DejaVuSans"], 1)
    with pytest.raises(ValueError, match="chars"):
        render("00", ["DejaVuSans"], 1)
    with pytest.raises(ValueError, match="fonts"):
        render("0", [], 1)
    with pytest.raises(ValueError, match="augment"):
        render("0", ["DejaVuSans"], 1, augment="strong")
