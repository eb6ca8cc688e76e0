"""Robust Weight Signatures (Cai, Zhang & Wang, ICML 2023): extract, patch, quantise and store.

A signature is the part of a corruption-robust fine-tuning update that is orthogonal to the clean
fine-tuning update, kept only for the shallow layers of a network:

    u = vec(theta_clean[l] - theta_init[l]),   v = vec(theta_robust[c][l] - theta_init[l])
    RWS[c][l] = v - (<v, u> / <u, u>) u

Patching adds `sum_c beta_c * RWS[c]` to a target state. This module holds the math and the storage
format; training the experts, choosing the coefficient on a corrupted validation split and the `bn`
option (keep | average | recalibrate) are the runner's job, built from `average_bn`, `bn_keys` and
`recalibrate_bn` below.

Layers (what K counts), our choice where the original had none:
- ResNets (a module with children layer1, layer2, ...; timm or torchvision, e.g. under `.body`):
  layer 1 is the stem (every parameter registered before `layer1`: conv1/bn1 or timm's deep stem
  `conv1.*` + `bn1`), then every residual block (layer1.0, layer1.1, ..., layer4.N) is one layer.
- Plain CNNs (VGG, nn.Sequential of convs): each convolution is a layer, together with the
  BatchNorm/GroupNorm that directly follows it. Linear layers are never part of a layer.
- A layer's keys are ALL its parameters: conv weights and biases, BatchNorm affine weight/bias and,
  in a block, its downsample branch. BatchNorm running statistics are buffers, never signed; they
  stay the target's (`bn=keep`) or come from `average_bn` / `recalibrate_bn`. The original ResNet-50
  path effectively signed only the block convolutions and averaged every BatchNorm and downsample
  tensor over the robust models: reproduce it with
  `[k for k in shallow_keys(model, K) if k not in set(bn_keys(model))]` plus `average_bn`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from rftbench.utils import save_tensors_atomic, state_digest  # noqa: F401  (state_digest: part of this API)

Signature = dict[str, torch.Tensor]
State = Mapping[str, torch.Tensor]

FORMAT = "rftbench.rws-signature/1"
_RANGES = "__ranges__"
_RESERVED = ("levels", "keys", "dtype")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (_BatchNorm, nn.GroupNorm)


# --------------------------------------------------------------------------------------- layers
def signature_layers(model: nn.Module) -> list[list[str]]:
    """Parameter names of every signature layer of `model`, in model order (see module docstring)."""
    root = _resnet_root(model)
    layers = _resnet_layers(model, *root) if root is not None else _conv_layers(model)
    layers = [names for names in layers if names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} is neither a ResNet (layer1, layer2, ... children) nor a CNN with "
            "convolutions: RWS layers are undefined for it"
        )
    return layers


def shallow_keys(model: nn.Module, k: int) -> list[str]:
    """Parameter names (state-dict keys) of the first `k` signature layers of `model`, in model order."""
    layers = signature_layers(model)
    if not 1 <= k <= len(layers):
        n = len(layers)
        raise ValueError(f"k={k} is out of range: {type(model).__name__} has {n} RWS layers (k in 1..{n})")
    return [name for names in layers[:k] for name in names]


def _resnet_root(model: nn.Module) -> tuple[str, list[str]] | None:
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if "layer1" in children and "layer2" in children:
            stages, i = [], 1
            while f"layer{i}" in children:
                stages.append(f"layer{i}")
                i += 1
            return name, stages
    return None


def _resnet_layers(model: nn.Module, root: str, stages: list[str]) -> list[list[str]]:
    prefix = f"{root}." if root else ""
    module = model.get_submodule(root)
    stem = []
    for child, _ in module.named_children():
        if child == "layer1":
            break
        stem.append(f"{prefix}{child}.")
    blocks = [
        [f"{prefix}{stage}.{block}."]
        for stage in stages
        for block, _ in module.get_submodule(stage).named_children()
    ]
    names = [name for name, _ in model.named_parameters()]
    return [[n for n in names if n.startswith(tuple(prefixes))] for prefixes in [stem, *blocks]]


def _conv_layers(model: nn.Module) -> list[list[str]]:
    layers: list[list[str]] = []
    open_layer = False
    for name, module in model.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if isinstance(module, _CONVS):
            layers.append(own)
            open_layer = True
        elif isinstance(module, _NORMS) and open_layer:
            layers[-1].extend(own)
        elif own:
            open_layer = False
    return layers


def bn_keys(model: nn.Module, downsample: bool = True) -> list[str]:
    """Floating-point state-dict keys of every BatchNorm (affine params and running stats) and, with
    `downsample`, of every module named `downsample` (its conv too): what `bn=average` replaces.
    `num_batches_tracked` counters are left out (they stay the target's)."""
    selected = set()
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) or (downsample and name.rsplit(".", 1)[-1] == "downsample"):
            selected.update(f"{name}.{key}" if name else key for key in module.state_dict())
    return [key for key, value in model.state_dict().items() if key in selected and value.is_floating_point()]


# ------------------------------------------------------------------------------------ signatures
def extract_signature(
    init_state: State,
    clean_state: State,
    robust_state: State,
    keys: Sequence[str],
    dtype: torch.dtype | None = None,
) -> Signature:
    """RWS per key: the robust update (robust - init) minus its projection on the clean update
    (clean - init); the robust update itself where the clean update is exactly zero.

    Computed in float64 in O(d) per tensor; returned in `dtype` (default: the robust tensor's dtype)
    on the robust tensor's device, in the order of `keys`.
    """
    if not keys:
        raise ValueError("no keys given: pass e.g. shallow_keys(model, k)")
    states = {"init": init_state, "clean": clean_state, "robust": robust_state}
    signature = {}
    for key in keys:
        for which, state in states.items():
            if key not in state:
                raise ValueError(f"key {key!r} is missing from the {which} state")
        shapes = {which: tuple(state[key].shape) for which, state in states.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"key {key!r} has different shapes across states: {shapes}")
        init, clean, robust = (state[key] for state in states.values())
        if not robust.is_floating_point():
            raise ValueError(f"key {key!r} holds a {robust.dtype} tensor; signatures are for floating-point weights")
        base = init.to(robust.device, torch.float64)
        u = (clean.to(robust.device, torch.float64) - base).flatten()
        v = (robust.to(torch.float64) - base).flatten()
        uu = torch.dot(u, u)
        rws = v if uu == 0 else v - (torch.dot(v, u) / uu) * u
        signature[key] = rws.reshape(robust.shape).to(dtype or robust.dtype)
    return signature


def patch(
    state: State,
    signatures: Mapping[str, Mapping[str, torch.Tensor]] | Sequence[Mapping[str, torch.Tensor]],
    coeffs: Mapping[str, float] | Sequence[float],
) -> dict[str, torch.Tensor]:
    """A new state: `state + sum_c coeffs[c] * signatures[c]` on the signature keys only.

    `signatures` and `coeffs` are both mappings (same names) or both sequences (same length). The
    coefficient is linear: the original code scaled each signature by its coefficient twice, so an
    original coefficient `b` is `beta = b ** 2` here. Sums are formed in float64 and rounded once to
    the state's dtype; zero coefficients are skipped, so all-zero coefficients give tensors equal
    bit for bit. `state` is never modified: patched keys are new tensors, every other key holds the
    very same tensor object as `state` (so "removing the patch" is keeping `state`).
    """
    terms = _terms(signatures, coeffs)
    for name, signature, _ in terms:
        for key, value in signature.items():
            if key not in state:
                raise ValueError(
                    f"signature {name!r} key {key!r} (shape {tuple(value.shape)}) is not in the state; "
                    "signature made for another architecture?"
                )
            if value.shape != state[key].shape:
                raise ValueError(
                    f"signature {name!r} key {key!r} has shape {tuple(value.shape)} but the state has "
                    f"{tuple(state[key].shape)}; signature made for another architecture?"
                )
    out = dict(state)
    touched = {key for _, signature, _ in terms for key in signature}
    for key in (k for k in state if k in touched):
        target = state[key]
        live = [(c, s[key]) for _, s, c in terms if c != 0 and key in s]
        if not live:
            out[key] = target.clone()
            continue
        acc = target.to(torch.float64)
        for c, delta in live:
            acc = acc + c * delta.to(target.device, torch.float64)
        out[key] = acc.to(target.dtype)
    return out


def _terms(signatures, coeffs) -> list[tuple[str, Mapping[str, torch.Tensor], float]]:
    if isinstance(signatures, Mapping) != isinstance(coeffs, Mapping):
        raise ValueError("signatures and coeffs must both be mappings (by name) or both be sequences")
    if isinstance(signatures, Mapping):
        if set(signatures) != set(coeffs):
            raise ValueError(f"coefficient names {sorted(coeffs)} do not match signature names {sorted(signatures)}")
        pairs = [(name, signatures[name], coeffs[name]) for name in signatures]
    else:
        if len(signatures) != len(coeffs):
            raise ValueError(f"{len(signatures)} signatures but {len(coeffs)} coefficients")
        pairs = [(str(i), s, c) for i, (s, c) in enumerate(zip(signatures, coeffs))]
    for name, _, c in pairs:
        if not math.isfinite(float(c)):
            raise ValueError(f"coefficient of signature {name!r} is {c}; it must be finite")
    return [(name, s, float(c)) for name, s, c in pairs]


def compose_coeffs(names: Sequence[str], alpha: float) -> dict[str, float]:
    """Default composition of N signatures: each gets `alpha / N`."""
    if not names:
        raise ValueError("compose_coeffs needs at least one signature name")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate signature names in {list(names)}")
    return {name: alpha / len(names) for name in names}


# ---------------------------------------------------------------------------------- quantisation
class QuantizedTensor(NamedTuple):
    """Per-tensor uniform min-max codes: value = low + code * scale (codes packed, see `code_bits`)."""

    codes: torch.Tensor  # uint8, 1-D, `8 // code_bits(levels)` codes per byte
    low: float
    scale: float
    levels: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def code_bits(levels: int) -> int:
    """Bits one code occupies in storage (1, 2, 4 or 8); 16 levels -> 4, 256 -> 8."""
    if not 2 <= levels <= 256:
        raise ValueError(f"levels={levels} is out of range: 2..256 (16 = 4 bit, 256 = 8 bit)")
    return next(b for b in (1, 2, 4, 8) if levels <= 1 << b)


def quantize_tensor(tensor: torch.Tensor, levels: int) -> QuantizedTensor:
    """Uniform min-max quantisation of one tensor onto `levels` values; a constant tensor is exact."""
    bits = code_bits(levels)
    x = tensor.detach().to("cpu", torch.float64).flatten()
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantise a tensor with NaN or infinite values")
    low = float(x.min()) if x.numel() else 0.0
    high = float(x.max()) if x.numel() else 0.0
    scale = (high - low) / (levels - 1)
    codes = torch.zeros_like(x) if scale == 0 else torch.round((x - low) / scale).clamp_(0, levels - 1)
    return QuantizedTensor(_pack(codes.to(torch.uint8), bits), low, scale, levels, tuple(tensor.shape), tensor.dtype)


def dequantize_tensor(q: QuantizedTensor) -> torch.Tensor:
    """The values on the grid, in the original shape and dtype (CPU)."""
    numel = math.prod(q.shape)
    codes = _unpack(q.codes, code_bits(q.levels), numel)
    return (q.low + codes.to(torch.float64) * q.scale).reshape(q.shape).to(q.dtype)


def quantize(signature: Mapping[str, torch.Tensor], levels: int) -> Signature:
    """Every tensor quantised per tensor with `levels` levels and dequantised (what `load_signature`
    returns for a signature saved with the same `levels`)."""
    return {key: dequantize_tensor(quantize_tensor(t, levels)) for key, t in signature.items()}


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    padded = torch.cat([codes, codes.new_zeros(-codes.numel() % per)]).view(-1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (padded << shifts).sum(1).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return ((packed.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)).flatten()[:numel]


# --------------------------------------------------------------------------------------- storage
def signature_nbytes(signature: Mapping[str, torch.Tensor], levels: int | None = None) -> int:
    """Bytes of tensor data `save_signature` writes for `signature` (header excluded)."""
    if levels is None:
        return sum(t.numel() * t.element_size() for t in signature.values())
    per = 8 // code_bits(levels)
    return sum(math.ceil(t.numel() / per) for t in signature.values()) + 16 * len(signature)


def full_copy_nbytes(state: State) -> int:
    """Bytes of a full copy of `state` with floating-point tensors in fp32 (others as they are)."""
    return sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in state.values())


def save_signature(
    path: str | Path,
    signature: Mapping[str, torch.Tensor],
    metadata: Mapping,
    levels: int | None = None,
) -> Path:
    """Write `signature` to a safetensors file (atomically), full precision or quantised to `levels`.

    `metadata` (JSON-serialisable: K, corruption, source hashes, ...) is stored JSON-encoded; the
    fields `levels`, `keys` and `dtype` are filled in by this function. Quantised tensors are stored
    as packed uint8 codes plus one float64 (low, scale) row per tensor.
    """
    if not signature:
        raise ValueError("cannot save an empty signature")
    dtypes = {t.dtype for t in signature.values()}
    if len(dtypes) != 1:
        raise ValueError(f"signature tensors must share one dtype, got {sorted(map(str, dtypes))}")
    auto = {"levels": levels, "keys": list(signature), "dtype": str(dtypes.pop()).removeprefix("torch.")}
    clash = [f for f in _RESERVED if f in metadata and metadata[f] != auto[f]]
    if clash:
        raise ValueError(f"metadata fields {clash} are set by save_signature and disagree with the signature")
    try:
        header = {"format": FORMAT, "metadata": json.dumps({**metadata, **auto})}
    except TypeError as err:
        raise ValueError(f"signature metadata must be JSON-serialisable: {err}") from err
    header["layout"] = json.dumps({key: list(t.shape) for key, t in signature.items()})
    if levels is None:
        tensors = dict(signature)
    else:
        quantised = {key: quantize_tensor(t, levels) for key, t in signature.items()}
        tensors = {key: q.codes for key, q in quantised.items()}
        tensors[_RANGES] = torch.tensor([[q.low, q.scale] for q in quantised.values()], dtype=torch.float64)
    save_tensors_atomic(path, tensors, metadata=header)
    return Path(path)


def load_signature(path: str | Path) -> tuple[Signature, dict]:
    """(signature, metadata) from a `save_signature` file; quantised files come back dequantised."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("format") != FORMAT:
            found = header.get("format")
            raise ValueError(f"{path} is not an RWS signature file (format {found!r}, expected {FORMAT!r})")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    metadata = json.loads(header["metadata"])
    shapes = json.loads(header["layout"])
    dtype = getattr(torch, metadata["dtype"])
    levels = metadata["levels"]
    if levels is None:
        return {key: tensors[key] for key in metadata["keys"]}, metadata
    ranges = tensors[_RANGES].tolist()
    signature = {
        key: dequantize_tensor(QuantizedTensor(tensors[key], low, scale, levels, tuple(shapes[key]), dtype))
        for key, (low, scale) in zip(metadata["keys"], ranges)
    }
    return signature, metadata


# -------------------------------------------------------------------------------------- BatchNorm
def average_bn(states: Sequence[State], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Mean over `states` (the robust models) of each key, in float64 rounded to the key's dtype:
    the `bn=average` tensors (use `bn_keys(model)`); merge into the target as `{**target, **avg}`."""
    if not states:
        raise ValueError("average_bn needs at least one state")
    out = {}
    for key in keys:
        missing = [i for i, s in enumerate(states) if key not in s]
        if missing:
            raise ValueError(f"key {key!r} is missing from states {missing}")
        tensors = [s[key] for s in states]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(f"key {key!r} has different shapes across states: {sorted(shapes)}")
        if not tensors[0].is_floating_point():
            raise ValueError(f"key {key!r} holds a {tensors[0].dtype} tensor; only floating-point tensors are averaged")
        device = tensors[0].device
        mean = torch.stack([t.to(device, torch.float64) for t in tensors]).mean(0)
        out[key] = mean.to(tensors[0].dtype)
    return out


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Sequence[torch.Tensor]],
    device: torch.device | str | None = None,
) -> int:
    """Re-estimate every BatchNorm's running statistics from `batches` (`bn=recalibrate`); returns the
    number of images used.

    Statistics are reset, then each batch (a tensor or an (images, ...) tuple, as a DataLoader gives)
    is forwarded with only the BatchNorm layers in train mode (dropout etc. stay in eval mode) and a
    momentum of b / (n + b): the running stats end as the sample-weighted mean of the per-batch
    statistics (PyTorch's momentum=None cumulative average when batches are equal-sized). Modes and
    momenta are restored afterwards; if no image was seen the old statistics are restored and
    ValueError is raised. The data (e.g. corrupted training images) is the runner's.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer tracking running statistics")
    if device is None:
        device = next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    saved = {m: {k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in norms}
    seen = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.train()
        for batch in batches:
            images = batch if isinstance(batch, torch.Tensor) else batch[0]
            size = images.shape[0]
            if size == 0:
                continue
            for m in norms:
                m.momentum = size / (seen + size)
            model(images.to(device))
            seen += size
        if seen == 0:
            raise ValueError("recalibrate_bn got no images; BatchNorm statistics left unchanged")
    except BaseException:
        for m, buffers in saved.items():
            for k, b in buffers.items():
                getattr(m, k).copy_(b)
        raise
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    return seen
