import warnings

import imagecorruptions
import imagecorruptions.corruptions as library
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rftbench.data import corruptions
from rftbench.data.corruptions import ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt, corrupted_set


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random colour images with a bright blob, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=size, mode="bilinear", align_corners=False)
    x[:, :, size // 3 : 2 * size // 3, size // 3 : 2 * size // 3] = 0.95
    return x


def test_names_follow_the_library_order():
    assert len(CORRUPTIONS) == 15 and len(EXTRA_CORRUPTIONS) == 4
    assert list(CORRUPTIONS) == imagecorruptions.get_corruption_names("common")
    assert list(EXTRA_CORRUPTIONS) == imagecorruptions.get_corruption_names("validation")
    assert CORRUPTIONS[0] == "gaussian_noise" and CORRUPTIONS[-1] == "jpeg_compression"


@pytest.mark.parametrize("corruption", ALL_CORRUPTIONS)
def test_every_corruption_works_on_32x32(corruption):
    x = _images(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a NaN cast to uint8
        outputs = [corrupt(x, corruption, severity, seed=0) for severity in (1, 5)]
    for y in outputs:
        assert y.shape == x.shape and y.dtype == torch.float32
        assert y.min() >= 0 and y.max() <= 1
        torch.testing.assert_close(y * 255, (y * 255).round(), rtol=0, atol=1e-4)  # uint8 levels
    assert not torch.equal(outputs[1], outputs[0])
    assert (outputs[1] - x).abs().mean() > 0.005  # severity 5 visibly changes the images


@pytest.mark.parametrize("corruption", ["frost", "fog", "zoom_blur", "motion_blur", "snow", "glass_blur"])
def test_non_square_images_keep_their_size(corruption):
    x = _images(1, size=48)[:, :, :32]
    assert corrupt(x, corruption, 3, seed=0).shape == (1, 3, 32, 48)


@pytest.mark.parametrize("corruption", ["gaussian_noise", "impulse_noise", "glass_blur", "frost", "fog"])
def test_reproducible_and_independent_of_batching(corruption):
    x = _images(8)
    a = corrupt(x[:4], corruption, 3, seed=5)
    b = corrupt(x, corruption, 3, seed=5)
    assert torch.equal(a, b[:4])
    assert torch.equal(b, corrupt(x, corruption, 3, seed=5))
    assert not torch.equal(b, corrupt(x, corruption, 3, seed=6))


def test_images_get_different_noise():
    x = _images(1).repeat(2, 1, 1, 1)
    y = corrupt(x, "gaussian_noise", 2, seed=0)
    assert not torch.equal(y[0], y[1])


def test_numpy_global_rng_is_restored():
    np.random.seed(123)
    expected = np.random.rand(3)
    np.random.seed(123)
    corrupt(_images(2), "shot_noise", 2, seed=0)
    assert np.array_equal(np.random.rand(3), expected)


def test_image_seeds_depend_on_every_coordinate():
    base = corruptions.image_seed(0, 0, "fog", 1)
    others = [corruptions.image_seed(1, 0, "fog", 1), corruptions.image_seed(0, 1, "fog", 1),
              corruptions.image_seed(0, 0, "frost", 1), corruptions.image_seed(0, 0, "fog", 2)]
    assert len({base, *others}) == 5
    assert base == corruptions.image_seed(0, 0, "fog", 1) and 0 <= base < 2**32


def test_contrast_matches_its_formula_per_channel():
    x = (_images(3) * 255).round() / 255
    y = corrupt(x, "contrast", 1, seed=0)  # (x - channel mean) * 0.4 + channel mean, truncated
    mean = x.double().mean(dim=(2, 3), keepdim=True)
    expected = torch.floor(((x.double() - mean) * 0.4 + mean).clamp(0, 1) * 255) / 255
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1 / 255 + 1e-9)
    assert (y.double() - expected).abs().mean() < 0.1 / 255


def test_severity_increases_the_damage():
    x = _images(6)
    for corruption in ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "contrast",
                       "brightness"):
        damage = [(corrupt(x, corruption, s, seed=0) - x).abs().mean().item() for s in (1, 3, 5)]
        assert damage[0] < damage[1] < damage[2], corruption


def test_spatter_without_liquid_returns_the_image():
    # Whether spatter's liquid layer is empty depends only on the image's RNG seed (not on its pixels).
    x = _images(1)
    pixels = corruptions._to_uint8(x)[0]
    for seed in range(500):
        np.random.seed(corruptions.image_seed(seed, 0, "spatter", 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if np.isnan(library.spatter(Image.fromarray(pixels), 1)).any():
                break
    else:
        pytest.fail("no empty spatter layer found")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = corrupt(x, "spatter", 1, seed=seed)
    assert torch.equal(y, torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255)


def test_invalid_arguments_raise():
    x = _images(1)
    with pytest.raises(ValueError, match="gaussian_noise, shot_noise"):
        corrupt(x, "rain", 1, 0)
    for severity in (0, 6, 2.5, True):
        with pytest.raises(ValueError, match="severity"):
            corrupt(x, "fog", severity, 0)
    with pytest.raises(ValueError, match="at least 32"):
        corrupt(_images(1, size=16), "fog", 1, 0)
    with pytest.raises(ValueError, match="shape"):
        corrupt(x[:, :1], "fog", 1, 0)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupted_set(x, ["fog", "rain"], [1], 0, "unused")


def test_corrupted_set_caches_in_one_file(tmp_path, monkeypatch):
    x = _images(3)
    names, severities = ["gaussian_noise", "pixelate", "spatter"], [1, 4]
    first = corrupted_set(x, names, severities, seed=2, cache_dir=tmp_path)
    assert set(first) == {(c, s) for c in names for s in severities}
    for (c, s), y in first.items():
        assert torch.equal(y, corrupt(x, c, s, seed=2))
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"

    def fail(*args, **kwargs):
        raise AssertionError("recomputed instead of loading the cache")

    monkeypatch.setattr(corruptions, "_corrupt_uint8", fail)
    monkeypatch.setattr(corruptions, "_library_corrupt", fail)
    second = corrupted_set(x, names, severities, seed=2, cache_dir=tmp_path)
    assert second.keys() == first.keys()
    assert all(torch.equal(second[k], first[k]) for k in first)
    with pytest.raises(AssertionError, match="recomputed"):
        corrupted_set(x, names, severities, seed=3, cache_dir=tmp_path)


def test_cache_key_depends_on_every_input():
    pixels = corruptions._to_uint8(_images(2))
    key = corruptions.cache_key
    changed = pixels.copy()
    changed[0, 0, 0, 0] ^= 1
    others = [key(pixels, ["fog"], [1], 1), key(pixels, ["frost"], [1], 0), key(pixels, ["fog"], [2], 0),
              key(changed, ["fog"], [1], 0), key(pixels[:1], ["fog"], [1], 0)]
    assert len({key(pixels, ["fog"], [1], 0), *others}) == 6
    assert key(pixels, ["fog"], [1], 0) == key(pixels.copy(), ["fog"], [1], 0)
