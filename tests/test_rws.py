"""RWS: layer selection, orthogonal signatures, exact patching, quantisation, storage, BatchNorm."""
from __future__ import annotations

import copy
import json
import math
import struct

import pytest
import torch
import torchvision
from torch import nn

from rftbench.backbones import create_backbone
from rftbench.methods.rws import (
    average_bn,
    bn_keys,
    code_bits,
    compose_coeffs,
    dequantize_tensor,
    extract_signature,
    full_copy_nbytes,
    load_signature,
    patch,
    quantize,
    quantize_tensor,
    recalibrate_bn,
    save_signature,
    shallow_keys,
    signature_layers,
    signature_nbytes,
    state_digest,
)

DIGITS_KWARGS = dict(channels=(32, 64, 128, 256), stem_width=16)


def resnet10t(channels=(32, 64, 128, 256)) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone("resnet10t", num_classes=10, kwargs=dict(channels=channels, stem_width=16))


def perturbed(state: dict, seed: int, scale: float = 1e-2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }


@pytest.fixture(scope="module")
def trio():
    """(model, init, clean, robust) float64 states of the digits resnet10t; robust shares part of the clean update."""
    model = resnet10t().double()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    clean = perturbed(init, 1)
    noise = perturbed(init, 2)
    robust = {
        k: init[k] + 0.7 * (clean[k] - init[k]) + (noise[k] - init[k]) if init[k].is_floating_point() else init[k]
        for k in init
    }
    return model, init, clean, robust


def small_cnn(bn: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), norm(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4),
    )


# ------------------------------------------------------------------------------------- layers
def test_timm_resnet18_layers_are_stem_plus_eight_blocks():
    model = create_backbone("resnet18", num_classes=10)
    layers = signature_layers(model)
    assert len(layers) == 9
    assert layers[0] == ["body.conv1.weight", "body.bn1.weight", "body.bn1.bias"]
    assert layers[1][0] == "body.layer1.0.conv1.weight" and all(n.startswith("body.layer1.0.") for n in layers[1])
    assert all(n.startswith("body.layer4.1.") for n in layers[8])
    assert any("downsample" in n for n in layers[3])  # layer2.0 has the downsample branch
    params = [n for n, _ in model.named_parameters()]
    assert shallow_keys(model, 9) == [n for n in params if not n.startswith("head.")]  # model order, all blocks
    assert shallow_keys(model, 2) == layers[0] + layers[1]


def test_torchvision_resnet18_and_timm_deep_stem():
    tv = create_backbone("resnet18", source="torchvision", num_classes=10)
    layers = signature_layers(tv)
    assert len(layers) == 9
    assert layers[0] == ["body.conv1.weight", "body.bn1.weight", "body.bn1.bias"]
    assert [n for n in layers[8] if n.endswith("conv2.weight")] == ["body.layer4.1.conv2.weight"]
    raw = torchvision.models.resnet18(weights=None)  # not wrapped: names without `body.`
    assert signature_layers(raw)[0] == ["conv1.weight", "bn1.weight", "bn1.bias"]

    deep = signature_layers(resnet10t())
    assert len(deep) == 5  # stem + one block per stage
    assert deep[0] == [
        "body.conv1.0.weight", "body.conv1.1.weight", "body.conv1.1.bias", "body.conv1.3.weight",
        "body.conv1.4.weight", "body.conv1.4.bias", "body.conv1.6.weight", "body.bn1.weight", "body.bn1.bias",
    ]


def test_vgg16_counts_thirteen_conv_layers():
    with torch.device("meta"):  # names only: skip allocating 138M parameters
        vgg = torchvision.models.vgg16(weights=None)
    layers = signature_layers(vgg)
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert layers == [[f"features.{i}.weight", f"features.{i}.bias"] for i in convs]
    assert len(shallow_keys(vgg, 7)) == 14  # the original VGG-16 default K = 7


def test_plain_cnn_layer_takes_its_following_batchnorm_only():
    layers = signature_layers(small_cnn())
    assert layers == [
        ["0.weight", "0.bias", "1.weight", "1.bias"],
        ["3.weight", "3.bias", "4.weight", "4.bias"],
    ]  # the Linear and the BatchNorm1d after it belong to no layer
    assert signature_layers(small_cnn(bn=False)) == [["0.weight", "0.bias"], ["3.weight", "3.bias"]]


def test_k_out_of_range_names_the_layer_count():
    model = resnet10t()
    for k in (0, 6):
        with pytest.raises(ValueError, match="has 5 RWS layers"):
            shallow_keys(model, k)
    with pytest.raises(ValueError, match="neither a ResNet"):
        signature_layers(nn.Sequential(nn.Linear(3, 3)))


# --------------------------------------------------------------------------------- signatures
def test_signature_known_values():
    init = {"w": torch.zeros(2, 2, dtype=torch.float64)}
    clean = {"w": torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)}
    robust = {"w": torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)}
    sig = extract_signature(init, clean, robust, ["w"])
    # v = (2,0,0,3), u = (1,1,0,0): <v,u>/<u,u> = 1 -> v - u = (1,-1,0,3)
    assert torch.equal(sig["w"], torch.tensor([[1.0, -1.0], [0.0, 3.0]], dtype=torch.float64))


def test_signature_is_orthogonal_to_the_clean_update(trio):
    model, init, clean, robust = trio
    keys = shallow_keys(model, 5)
    sig = extract_signature(init, clean, robust, keys)
    assert list(sig) == keys
    for key in keys:
        u = (clean[key] - init[key]).flatten()
        s = sig[key].flatten()
        assert sig[key].shape == init[key].shape and sig[key].dtype == torch.float64
        assert abs(torch.dot(s, u)) / (s.norm() * u.norm()) < 1e-10
        v = (robust[key] - init[key]).flatten()
        assert torch.allclose(v - s, (torch.dot(v, u) / torch.dot(u, u)) * u, rtol=0, atol=1e-12)
        assert s.norm() < v.norm()  # the clean-parallel part (0.7 u) was removed

    f32 = lambda st: {k: v.float() for k, v in st.items()}  # noqa: E731
    sig32 = extract_signature(f32(init), f32(clean), f32(robust), keys)
    for key in keys:
        assert sig32[key].dtype == torch.float32
        u = (clean[key] - init[key]).flatten()
        s = sig32[key].double().flatten()
        assert abs(torch.dot(s, u)) / (s.norm() * u.norm()) < 1e-6  # float32 storage rounding only


def test_signature_is_linear_time_on_a_large_tensor():
    torch.manual_seed(0)
    d = (1000, 2000)  # a d x d projection matrix would need 32 TB
    init, clean, robust = ({"w": torch.randn(d)} for _ in range(3))
    sig = extract_signature(init, clean, robust, ["w"], dtype=torch.float64)
    u = (clean["w"] - init["w"]).double().flatten()
    assert abs(torch.dot(sig["w"].flatten(), u)) / (sig["w"].norm() * u.norm()) < 1e-10


def test_unchanged_clean_tensor_gives_the_robust_update(trio):
    _, init, _, robust = trio
    key = "body.conv1.0.weight"
    sig = extract_signature(init, init, robust, [key])
    assert torch.equal(sig[key], robust[key] - init[key])
    assert torch.isfinite(sig[key]).all()


def test_extract_errors_name_the_key(trio):
    _, init, clean, robust = trio
    with pytest.raises(ValueError, match="'nope' is missing from the init state"):
        extract_signature(init, clean, robust, ["nope"])
    bad = dict(robust, **{"body.bn1.bias": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="'body.bn1.bias' has different shapes"):
        extract_signature(init, clean, bad, ["body.bn1.bias"])
    with pytest.raises(ValueError, match="floating-point"):
        extract_signature(init, clean, robust, ["body.bn1.num_batches_tracked"])


# ------------------------------------------------------------------------------------- patching
@pytest.fixture(scope="module")
def sigs(trio):
    model, init, clean, robust = trio
    keys = shallow_keys(model, 3)
    robust_b = perturbed(init, 3)
    return keys, {
        "fog": extract_signature(init, clean, robust, keys),
        "snow": extract_signature(init, clean, robust_b, keys),
    }


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int64) if t.dtype == torch.float64 else t


def test_zero_patch_is_bit_exact_and_never_modifies_input(trio, sigs):
    _, _, clean, _ = trio
    keys, signatures = sigs
    state = dict(clean)
    state["body.conv1.0.weight"] = state["body.conv1.0.weight"].clone()
    state["body.conv1.0.weight"][0, 0, 0, 0] = -0.0  # the sign of zero must survive too
    original = copy.deepcopy(state)
    out = patch(state, signatures, {"fog": 0.0, "snow": 0.0})
    assert list(out) == list(state)
    for key in state:
        assert torch.equal(bits(out[key]), bits(original[key])), key
    for key in keys:
        assert out[key] is not state[key] and out[key].data_ptr() != state[key].data_ptr()

    patched = patch(state, signatures, {"fog": 0.5, "snow": 0.25})
    for key in state:
        assert torch.equal(bits(state[key]), bits(original[key])), key  # input untouched: unpatching = keep it
        if key in keys:
            assert not torch.equal(patched[key], state[key])
        else:
            assert patched[key] is state[key]  # only signature keys are touched


def test_composition_equals_sum_of_single_patches(trio, sigs):
    _, _, clean, _ = trio
    keys, signatures = sigs
    coeffs = compose_coeffs(["fog", "snow"], 0.9)
    assert coeffs == {"fog": 0.45, "snow": 0.45}
    together = patch(clean, signatures, coeffs)
    fog_only = patch(clean, {"fog": signatures["fog"]}, {"fog": 0.45})
    chained = patch(fog_only, {"snow": signatures["snow"]}, {"snow": 0.45})
    as_lists = patch(clean, [signatures["fog"], signatures["snow"]], [0.45, 0.45])
    for key in keys:
        expected = clean[key] + 0.45 * signatures["fog"][key] + 0.45 * signatures["snow"][key]
        assert torch.allclose(together[key], expected, rtol=0, atol=1e-12)
        assert torch.allclose(together[key], chained[key], rtol=0, atol=1e-6)
        assert torch.equal(together[key], as_lists[key])
    assert compose_coeffs(["a", "b", "c", "d"], 1.0) == dict.fromkeys("abcd", 0.25)


def test_patch_float32_state_rounds_once():
    state = {"w": torch.tensor([1.0, 2.0, 3.0])}
    sig = {"w": torch.tensor([1e-3, -1e-3, 0.5])}
    out = patch(state, {"a": sig}, {"a": 2.0})
    assert out["w"].dtype == torch.float32
    assert torch.equal(out["w"], (state["w"].double() + 2.0 * sig["w"].double()).float())


def test_signature_for_another_architecture_fails_clearly(sigs):
    _, signatures = sigs
    narrow = resnet10t(channels=(16, 32, 64, 128)).double().state_dict()
    message = r"'body.layer1.0.conv1.weight' has shape \(32, 32, 3, 3\) but the state has \(16, 32, 3, 3\).*another"
    with pytest.raises(ValueError, match=message):
        patch(narrow, signatures, {"fog": 1.0, "snow": 0.0})
    tv = create_backbone("resnet18", source="torchvision", num_classes=10).state_dict()
    with pytest.raises(ValueError, match="'body.conv1.0.weight'.*is not in the state.*another architecture"):
        patch(tv, {"fog": signatures["fog"]}, {"fog": 1.0})


def test_patch_argument_errors(trio, sigs):
    _, _, clean, _ = trio
    _, signatures = sigs
    with pytest.raises(ValueError, match="do not match"):
        patch(clean, signatures, {"fog": 1.0})
    with pytest.raises(ValueError, match="both be mappings"):
        patch(clean, signatures, [1.0, 1.0])
    with pytest.raises(ValueError, match="2 signatures but 1"):
        patch(clean, list(signatures.values()), [1.0])
    with pytest.raises(ValueError, match="finite"):
        patch(clean, signatures, {"fog": float("nan"), "snow": 0.0})
    with pytest.raises(ValueError, match="duplicate"):
        compose_coeffs(["fog", "fog"], 1.0)


# --------------------------------------------------------------------------------- quantisation
@pytest.mark.parametrize("levels", [2, 3, 16, 256])
def test_quantisation_grid_and_error_bound(sigs, levels):
    _, signatures = sigs
    sig = {k: v.float() for k, v in signatures["fog"].items()}
    q = quantize(sig, levels)
    for key, t in sig.items():
        assert q[key].shape == t.shape and q[key].dtype == t.dtype
        assert q[key].unique().numel() <= levels
        lo, hi = t.min().item(), t.max().item()
        err = (q[key].double() - t.double()).abs().max().item()
        assert err <= (hi - lo) / (2 * (levels - 1)) + 1e-6 * max(abs(lo), abs(hi)), key
        assert q[key].min().item() == lo  # the low end is exactly on the grid


def test_quantisation_edge_cases():
    const = torch.full((3, 5), -0.25)
    for levels in (2, 16, 256):
        assert torch.equal(quantize({"c": const}, levels)["c"], const)
    assert torch.equal(quantize({"e": torch.zeros(0, 3)}, 16)["e"], torch.zeros(0, 3))
    # a uniform ramp on exactly `levels` points is reproduced (odd numel exercises nibble padding)
    ramp = torch.linspace(-1, 1, 15, dtype=torch.float64)
    q = quantize_tensor(ramp, 15)
    assert q.codes.numel() == 8 and code_bits(15) == 4
    assert torch.allclose(dequantize_tensor(q), ramp, rtol=0, atol=1e-15)
    assert [code_bits(n) for n in (2, 4, 5, 16, 17, 256)] == [1, 2, 4, 4, 8, 8]
    for bad in (1, 257):
        with pytest.raises(ValueError, match="levels"):
            quantize({"c": const}, bad)
    with pytest.raises(ValueError, match="NaN"):
        quantize({"n": torch.tensor([0.0, float("nan")])}, 16)


# --------------------------------------------------------------------------------------- storage
def file_payload(path) -> int:
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header_len


def test_save_load_round_trip(tmp_path, trio, sigs):
    model, init, clean, robust = trio
    keys, signatures = sigs
    sig = {k: v.float() for k, v in signatures["fog"].items()}
    sources = {"init": state_digest(init), "clean": state_digest(clean), "robust": state_digest(robust)}
    meta = {"K": 3, "corruption": "fog", "severity": 5, "sources": sources}

    full = save_signature(tmp_path / "fog.safetensors", sig, meta)
    loaded, loaded_meta = load_signature(full)
    assert list(loaded) == keys
    assert all(torch.equal(loaded[k], sig[k]) and loaded[k].dtype == torch.float32 for k in keys)
    assert loaded_meta == {**meta, "levels": None, "keys": keys, "dtype": "float32"}
    assert file_payload(full) == signature_nbytes(sig) == 4 * sum(t.numel() for t in sig.values())

    sizes = {}
    for levels in (16, 256):
        path = save_signature(tmp_path / f"fog-{levels}.safetensors", sig, meta, levels=levels)
        got, got_meta = load_signature(path)
        expected = quantize(sig, levels)
        assert list(got) == keys and all(torch.equal(got[k], expected[k]) for k in keys)
        assert got_meta["levels"] == levels and got_meta["sources"] == meta["sources"]
        assert file_payload(path) == signature_nbytes(sig, levels)
        sizes[levels] = path.stat().st_size
    assert sizes[16] < sizes[256] < full.stat().st_size
    assert signature_nbytes(sig, 16) == sum(math.ceil(t.numel() / 2) for t in sig.values()) + 16 * len(sig)

    # re-saving a loaded signature with its own metadata is allowed; contradicting it is not
    save_signature(tmp_path / "again.safetensors", loaded, loaded_meta)
    with pytest.raises(ValueError, match="set by save_signature"):
        save_signature(tmp_path / "bad.safetensors", sig, {**meta, "levels": 16})
    with pytest.raises(ValueError, match="JSON"):
        save_signature(tmp_path / "bad.safetensors", sig, {"t": torch.zeros(1)})
    assert not (tmp_path / "bad.safetensors").exists()


def test_not_a_signature_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an RWS signature file"):
        load_signature(tmp_path / "plain.safetensors")


def test_storage_accounting_and_digest():
    state = {"w": torch.zeros(10, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float16), "n": torch.tensor(7)}
    assert full_copy_nbytes(state) == 4 * 13 + 8  # floats counted as fp32, the int64 counter as is
    digest = state_digest(state)
    assert len(digest) == 64 and digest == state_digest({k: state[k].clone() for k in reversed(list(state))})
    changed = dict(state, n=torch.tensor(8))
    assert state_digest(changed) != digest
    model = resnet10t()
    ratio = full_copy_nbytes(model.state_dict()) / signature_nbytes(
        {k: p for k, p in model.state_dict().items() if k in set(shallow_keys(model, 2))}, 16)
    assert ratio > 8  # stem + first block, 4 bit: far below a full fp32 copy


# ------------------------------------------------------------------------------------- BatchNorm
def test_bn_keys_and_average():
    model = resnet10t()
    keys = bn_keys(model)
    assert "body.bn1.running_var" in keys and "body.conv1.1.weight" in keys
    assert "body.layer2.0.downsample.1.weight" in keys  # the downsample conv
    assert "body.layer2.0.downsample.2.running_mean" in keys
    assert not any(k.endswith("num_batches_tracked") for k in keys)
    assert "body.layer1.0.conv1.weight" not in keys
    assert "body.layer2.0.downsample.1.weight" not in bn_keys(model, downsample=False)
    assert list(keys) == [k for k in model.state_dict() if k in set(keys)]

    states = [{k: torch.full_like(v, float(i)) for k, v in model.state_dict().items()} for i in (1, 2, 6)]
    avg = average_bn(states, keys)
    assert list(avg) == keys and all(torch.equal(v, torch.full_like(v, 3.0)) for v in avg.values())
    with pytest.raises(ValueError, match="only floating-point"):
        average_bn(states, ["body.bn1.num_batches_tracked"])
    with pytest.raises(ValueError, match="missing from states \\[1\\]"):
        average_bn([states[0], {}], ["body.bn1.weight"])


def test_recalibrate_bn_sample_weighted_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.9), nn.BatchNorm2d(3))
    model.eval()
    data = [torch.randn(4, 3, 5, 5) * 2 + 1, torch.randn(2, 3, 5, 5) - 3, torch.zeros(0, 3, 5, 5)]
    batches = [(data[0], torch.zeros(4)), data[1], data[2]]
    assert recalibrate_bn(model, batches) == 6
    bn = model[1]
    means = torch.stack([x.mean((0, 2, 3)) for x in data[:2]])
    variances = torch.stack([x.var((0, 2, 3), unbiased=True) for x in data[:2]])
    w = torch.tensor([[4.0], [2.0]]) / 6
    assert torch.allclose(bn.running_mean, (w * means).sum(0), atol=1e-6)  # dropout stayed off
    assert torch.allclose(bn.running_mean, torch.cat(data[:2]).mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(bn.running_var, (w * variances).sum(0), atol=1e-5)
    assert not model.training and not bn.training and bn.momentum == 0.1

    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match="no images"):
        recalibrate_bn(model, [])
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_bn(nn.Sequential(nn.Conv2d(3, 3, 1)), [data[0]])


def test_recalibrated_digits_backbone_matches_its_eval_statistics():
    model = resnet10t()
    model.train()
    images = torch.rand(8, 3, 32, 32)
    assert recalibrate_bn(model, [images], device="cpu") == 8
    assert model.training and all(m.training for m in model.modules())
    bn = model.body.bn1
    assert bn.num_batches_tracked.item() == 1
    with torch.no_grad():  # train mode: the deep stem's inner BatchNorms use these same batch statistics
        stem = model.body.conv1(model.normalize(images))
    assert torch.allclose(bn.running_mean, stem.mean((0, 2, 3)), atol=1e-5)


def test_metadata_is_json(tmp_path, sigs):
    _, signatures = sigs
    path = save_signature(tmp_path / "s.safetensors", signatures["snow"], {"K": 3})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    assert json.loads(header["metadata"])["K"] == 3 and json.loads(header["metadata"])["dtype"] == "float64"
