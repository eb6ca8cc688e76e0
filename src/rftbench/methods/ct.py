"""Curvature Tuning (Hu & Balestriero, arXiv 2502.07783): ReLU kinks -> curvature-tunable units.

`apply_ct` returns a copy of a ReLU-family network in which every kink of a piecewise-affine
activation is a `CTU` (one CT site per kink):
  ReLU(x)                -> CTU(x)
  LeakyReLU(x; s)        =  s x + (1 - s) ReLU(x)              -> s x + (1 - s) CTU(x)        (`CTLeakyReLU`)
  Hardtanh(x; lo, hi)    =  lo + ReLU(x - lo) - ReLU(x - hi)   -> lo + CTU(x - lo) - CTU(x - hi) (`CTHardtanh`)
  ReLU6(x) = Hardtanh(x; 0, 6)                                  -> CTU(x) - CTU(x - 6)
At beta = 1 every converted activation is the original op bit for bit. Registered activation
modules used at one site are swapped; modules whose `forward` calls one functionally (`F.relu`,
`torch.relu(_)`, `Tensor.relu(_)`, `F.relu6`, `F.hardtanh(_)`, `F.leaky_relu(_)`, a module built inside
`forward`) or calls one module at several sites (torchvision's BasicBlock / Bottleneck `self.relu`)
are rewritten with a shallow `torch.fx` trace (children stay opaque), new CT modules per site.
`apply_trainable_ct` does the same with per-channel `TrainableCTU`s (one per kink) sized from an
example input. Hardswish / Hardsigmoid / HardMish are not piecewise affine and are refused.
The paper and the authors' code handle ReLU only; the extension to the other kinks is ours.
"""
from __future__ import annotations

import copy
import inspect
import re
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode

EPS = 1e-6
SOFTPLUS_THRESHOLD = 20.0
NO_SITES_MSG = (
    "model has no ReLU activation sites (ReLU, ReLU6, LeakyReLU, Hardtanh); CT needs a ReLU network"
)
NOT_PIECEWISE_MSG = "CT cannot convert Hardswish / Hardsigmoid / HardMish (not piecewise affine)"

# a site's kind: ("relu", ()), ("hardtanh", (lo, hi)) or ("leaky_relu", (slope,))
Kind = tuple[str, tuple[float, ...]]
# functional sites: kind, its parameters after `input` (name, default), whether always in place
_FUNCTIONS: dict[Callable, tuple[str, tuple[tuple[str, float], ...], bool]] = {
    F.relu: ("relu", (), False),
    F.relu_: ("relu", (), True),
    torch.relu: ("relu", (), False),
    torch.relu_: ("relu", (), True),
    F.relu6: ("relu6", (), False),
    F.hardtanh: ("hardtanh", (("min_val", -1.0), ("max_val", 1.0)), False),
    F.hardtanh_: ("hardtanh", (("min_val", -1.0), ("max_val", 1.0)), True),
    F.leaky_relu: ("leaky_relu", (("negative_slope", 0.01),), False),
    F.leaky_relu_: ("leaky_relu", (("negative_slope", 0.01),), True),
}
_RELU_METHODS = {"relu": False, "relu_": True}
_RELU_CALLABLES = (*_FUNCTIONS, torch.Tensor.relu, torch.Tensor.relu_)
_NOT_PIECEWISE_CALLABLES = (F.hardswish, F.hardsigmoid)
_NOT_PIECEWISE_NAME = re.compile(r"hard_?(swish|sigmoid|mish)", re.IGNORECASE)


def ctu(x: torch.Tensor, beta: float | torch.Tensor, coeff: float | torch.Tensor) -> torch.Tensor:
    """c * sigmoid(beta x / s) x + (1 - c) s softplus(x / s), s = 1 - beta + eps, in x's dtype."""
    s = 1.0 - beta + EPS
    smooth_gate = torch.sigmoid(beta * x / s) * x
    smooth_max = s * F.softplus(x / s, threshold=SOFTPLUS_THRESHOLD)
    return coeff * smooth_gate + (1.0 - coeff) * smooth_max


def _in_float32(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn(x) computed in at least float32 with autocast off (x / s overflows half precision)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return fn(x.to(torch.promote_types(x.dtype, torch.float32))).to(x.dtype)


def _check_unit(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"CT {name} must lie in [0, 1], got {value}")
    return value


class CTU(nn.Module):
    """Curvature-tunable unit with fixed beta and coeff; beta == 1 is exactly ReLU."""

    def __init__(self, beta: float, coeff: float = 0.5):
        super().__init__()
        self.beta = _check_unit("beta", beta)
        self.coeff = _check_unit("coeff", coeff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.beta == 1.0:
            return torch.relu(x)
        return _in_float32(lambda v: ctu(v, self.beta, self.coeff), x)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, coeff={self.coeff}"


class TrainableCTU(nn.Module):
    """CTU with per-channel beta_k = sigmoid(r_k) and c_k = sigmoid(q_k) (trainable r, q)."""

    def __init__(self, num_channels: int, channel_dim: int, r_init: float = 1.386, q_init: float = 0.0):
        super().__init__()
        self.num_channels = num_channels
        self.channel_dim = channel_dim
        self.r = nn.Parameter(torch.full((num_channels,), float(r_init)))
        self.q = nn.Parameter(torch.full((num_channels,), float(q_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim] = self.num_channels

        def fn(v: torch.Tensor) -> torch.Tensor:
            beta, coeff = (torch.sigmoid(p.to(v.dtype)).view(shape) for p in (self.r, self.q))
            return ctu(v, beta, coeff)

        return _in_float32(fn, x)

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, channel_dim={self.channel_dim}"


_CT_TYPES = (CTU, TrainableCTU)


def _exactly_relu(*units: nn.Module) -> bool:
    return all(isinstance(u, CTU) and u.beta == 1.0 for u in units)


class CTHardtanh(nn.Module):
    """lo + kink_lo(x - lo) - kink_hi(x - hi): Hardtanh / ReLU6 with a CT unit at each of its two kinks."""

    def __init__(self, lo: float, hi: float, kink_lo: nn.Module, kink_hi: nn.Module):
        super().__init__()
        if not lo < hi:
            raise ValueError(f"Hardtanh needs lo < hi, got {lo}, {hi}")
        self.lo, self.hi = float(lo), float(hi)
        self.kink_lo, self.kink_hi = kink_lo, kink_hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exactly_relu(self.kink_lo, self.kink_hi):  # the native op (also its gradient at the kinks)
            return torch._C._nn.hardtanh(x, self.lo, self.hi)
        return self.lo + self.kink_lo(x - self.lo) - self.kink_hi(x - self.hi)

    def extra_repr(self) -> str:
        return f"lo={self.lo}, hi={self.hi}"


class CTLeakyReLU(nn.Module):
    """slope x + (1 - slope) kink(x): LeakyReLU with a CT unit at its kink."""

    def __init__(self, slope: float, kink: nn.Module):
        super().__init__()
        self.slope = float(slope)
        self.kink = kink

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exactly_relu(self.kink):
            return torch._C._nn.leaky_relu(x, self.slope)
        return self.slope * x + (1.0 - self.slope) * self.kink(x)

    def extra_repr(self) -> str:
        return f"slope={self.slope}"


_COMPOSITE_TYPES = (CTHardtanh, CTLeakyReLU)


def _module_kind(m: nn.Module) -> Kind | None:
    """The kind of a piecewise-affine activation module; None for any other module."""
    if isinstance(m, nn.ReLU):
        return ("relu", ())
    if isinstance(m, nn.Hardtanh):  # nn.ReLU6 included
        return ("hardtanh", (float(m.min_val), float(m.max_val)))
    if isinstance(m, nn.LeakyReLU):
        return ("leaky_relu", (float(m.negative_slope),))
    return None


def _build(kind: Kind, make_unit: Callable[[], nn.Module]) -> nn.Module:
    """The CT module of one activation site: one `make_unit()` per kink."""
    name, params = kind
    if name == "relu":
        return make_unit()
    if name == "hardtanh":
        return CTHardtanh(*params, make_unit(), make_unit())
    return CTLeakyReLU(*params, make_unit())


def apply_ct(
    model: nn.Module, beta: float, coeff: float = 0.5, example_input: torch.Tensor | None = None
) -> nn.Module:
    """Copy of `model` with a `CTU(beta, coeff)` at every kink of every ReLU / ReLU6 / LeakyReLU /
    Hardtanh site; `.ct_sites` = number of kinks (ReLU 1, LeakyReLU 1, ReLU6 / Hardtanh 2).

    With `example_input`, also checks that a forward pass executes none of them any more.
    """
    beta, coeff = _check_unit("beta", beta), _check_unit("coeff", coeff)
    out, untraced = _replace_relu_sites(model, lambda: CTU(beta, coeff))
    if example_input is not None:
        _check_no_relu_left(out, example_input, untraced)
    return out


def apply_trainable_ct(
    model: nn.Module, example_input: torch.Tensor, r_init: float = 1.386, q_init: float = 0.0
) -> nn.Module:
    """Copy of `model` with one `TrainableCTU` per kink (as `apply_ct`), channels read from `example_input`."""
    out, untraced = _replace_relu_sites(model, _SiteProbe)
    probes = [m for m in out.modules() if isinstance(m, _SiteProbe)]
    _check_no_relu_left(out, example_input, untraced)
    mapping: dict[int, nn.Module] = {}
    for probe in probes:
        if len(probe.shapes) != 1:
            raise ValueError(
                f"a ReLU kink ran {len(probe.shapes)} times on example_input (expected once): it is either "
                "not on the example's path or a ReLU module reused at several sites of an untraceable module"
            )
        shape = probe.shapes[0]
        channel_dim = 1 if len(shape) >= 4 else -1
        unit = TrainableCTU(shape[channel_dim], channel_dim, r_init, q_init).to(probe.device)
        mapping[id(probe)] = unit
    sites = out.ct_sites
    out = _swap_modules(out, mapping)
    out.ct_sites = sites
    return out


def count_ct_sites(model: nn.Module) -> int:
    """Number of CT units (`CTU` / `TrainableCTU`, one per kink) in `model`."""
    return sum(isinstance(m, _CT_TYPES) for m in model.modules())


def set_beta(model: nn.Module, beta: float, coeff: float | None = None) -> None:
    """Set beta (and optionally coeff) of every `CTU` of an already converted model, in place."""
    beta = _check_unit("beta", beta)
    coeff = None if coeff is None else _check_unit("coeff", coeff)
    units = [m for m in model.modules() if isinstance(m, CTU)]
    if not units:
        raise ValueError("model has no CTU modules; convert it with apply_ct first")
    for unit in units:
        unit.beta = beta
        if coeff is not None:
            unit.coeff = coeff


def ct_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable CT parameters (r and q of every `TrainableCTU`)."""
    return [p for m in model.modules() if isinstance(m, TrainableCTU) for p in (m.r, m.q)]


def mean_beta_coeff(model: nn.Module) -> tuple[float, float]:
    """Mean beta and mean coeff over all channels of all `TrainableCTU` sites."""
    units = [m for m in model.modules() if isinstance(m, TrainableCTU)]
    if not units:
        raise ValueError("model has no TrainableCTU modules; convert it with apply_trainable_ct first")
    with torch.no_grad():
        betas = torch.cat([torch.sigmoid(m.r.float()) for m in units])
        coeffs = torch.cat([torch.sigmoid(m.q.float()) for m in units])
    return betas.mean().item(), coeffs.mean().item()


def count_relu_calls(model: nn.Module, example_input: torch.Tensor) -> int:
    """Number of ReLU / ReLU6 / LeakyReLU / Hardtanh calls (module or functional) one eval-mode
    forward pass of `model` executes."""
    return _count_calls(model, example_input).calls


def _count_calls(model: nn.Module, example_input: torch.Tensor) -> "_ReluCounter":
    counter = _ReluCounter()
    with _eval_mode(model), torch.no_grad(), counter:
        model(example_input)
    return counter


class _SiteProbe(nn.Module):
    """Placeholder at a site: records input shapes, acts as ReLU (without calling a relu op)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.device = torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        self.device = x.device
        return x.clamp_min(0)


class _ReluCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.not_piecewise: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELU_CALLABLES:
            self.calls += 1
        elif func in _NOT_PIECEWISE_CALLABLES:
            self.not_piecewise[f"F.{func.__name__}"] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """All modules in eval mode; the original training flags are restored on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _check_no_relu_left(model: nn.Module, example_input: torch.Tensor, untraced: dict[str, str]) -> None:
    counter = _count_calls(model, example_input)
    if counter.not_piecewise:
        found = ", ".join(f"{k} x{n}" for k, n in counter.not_piecewise.most_common())
        raise ValueError(f"{NOT_PIECEWISE_MSG}; functional calls found: {found}")
    left = counter.calls
    if left:
        detail = "; ".join(f"{k or '<root>'}: {v}" for k, v in untraced.items()) or "none"
        raise RuntimeError(f"{left} ReLU calls remain after CT conversion; modules fx could not trace: {detail}")


class _ShallowTracer(fx.Tracer):
    """Traces one module's own `forward`; registered submodules stay opaque call_module nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def call_module(self, m, forward, args, kwargs):
        try:
            self.path_of_module(m)
        except NameError:  # a module built inside forward: trace through it
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


def _trace(m: nn.Module) -> fx.Graph:
    """Shallow trace of `m.forward`; arguments with defaults are fixed to them (fx asserts that)."""
    params = inspect.signature(m.forward).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    graph = _ShallowTracer().trace(m, concrete_args=defaults or None)
    for node in graph.nodes:  # fx renames specialised arguments (`flag` -> `flag_1`): restore
        base = re.sub(r"_\d+$", "", str(node.target))
        if node.op == "placeholder" and node.target not in defaults and base in defaults:
            node.target = base
    return graph


def _needs_trace(m: nn.Module) -> bool:
    if _module_kind(m) is not None or isinstance(m, (*_CT_TYPES, *_COMPOSITE_TYPES, _SiteProbe)):
        return False
    builtin = type(m).__module__.startswith("torch.nn.modules")
    return not builtin or isinstance(m, nn.Sequential)


def _site(root: nn.Module, node: fx.Node) -> tuple[Kind, bool] | None:
    """(kind, whether it works in place) of an activation site node; None if the node is no site."""
    if node.op == "call_module" and (kind := _module_kind(root.get_submodule(node.target))) is not None:
        return kind, bool(root.get_submodule(node.target).inplace)
    if node.op == "call_function" and node.target in _FUNCTIONS:
        name, params, always_inplace = _FUNCTIONS[node.target]
        names = [p for p, _ in params] + ([] if always_inplace else ["inplace"])
        given = dict(zip(names, node.args[1:])) | {k: v for k, v in node.kwargs.items() if k != "input"}
        if any(isinstance(v, fx.Node) for v in given.values()):
            raise ValueError(f"{node.target.__name__} with traced (non-constant) arguments: {given}")
        values = tuple(float(given.get(p, default)) for p, default in params)
        kind = ("hardtanh", (0.0, 6.0)) if name == "relu6" else (name, values)
        return kind, always_inplace or bool(given.get("inplace", False))
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return ("relu", ()), _RELU_METHODS[node.target]
    return None


def _site_input(node: fx.Node) -> fx.node.Argument:
    return node.args[0] if node.args else node.kwargs["input"]


def _nodes_after(node: fx.Node) -> Iterator[fx.Node]:
    later = node.next
    while later.op != "root":
        yield later
        later = later.next


def _trace_code(m: nn.Module, training: bool) -> str:
    saved = m.training
    m.training = training
    try:
        return _trace(m).python_code("self").src
    finally:
        m.training = saved


def _rewrite(
    m: nn.Module, graph: fx.Graph, sites: list[tuple[fx.Node, Kind, bool]], make_unit: Callable[[], nn.Module]
) -> fx.GraphModule:
    """GraphModule of `m` with one new CT module per activation site node."""
    if _trace_code(m, True) != _trace_code(m, False):
        raise RuntimeError(f"cannot apply CT to {type(m).__name__}: its forward depends on self.training")
    for name, child in list(m.named_children()):
        if _module_kind(child) is not None:
            delattr(m, name)
    for node, kind, inplace in sites:
        base = node.target if node.op == "call_module" and "." not in node.target else kind[0]
        name, k = base, 0
        while hasattr(m, name):
            k += 1
            name = f"{base}_{k}"
        m.add_module(name, _build(kind, make_unit))
        value = _site_input(node)
        with graph.inserting_after(node):
            unit_node = graph.call_module(name, (value,))
        if inplace and isinstance(value, fx.Node):  # later reads of the input see the activation
            later = set(_nodes_after(unit_node))
            value.replace_all_uses_with(unit_node, delete_user_cb=lambda user: user in later)
        node.replace_all_uses_with(unit_node)
        graph.erase_node(node)
    graph.lint()
    gm = fx.GraphModule(m, graph, class_name=type(m).__name__)
    gm.training = m.training
    return gm


def _replace_relu_sites(
    model: nn.Module, make_unit: Callable[[], nn.Module]
) -> tuple[nn.Module, dict[str, str]]:
    """(copy of `model` with new units at every activation kink, {name: error} of modules fx could not trace)."""
    not_piecewise = Counter(type(m).__name__ for m in model.modules() if _NOT_PIECEWISE_NAME.search(type(m).__name__))
    if not_piecewise:
        found = ", ".join(f"{k} x{n}" for k, n in not_piecewise.most_common())
        raise ValueError(f"{NOT_PIECEWISE_MSG}; activations found: {found}")
    model = copy.deepcopy(model)
    created: list[nn.Module] = []

    def make() -> nn.Module:
        created.append(make_unit())
        return created[-1]

    plans, untraced, calls = [], {}, Counter()
    for name, m in model.named_modules():
        if not _needs_trace(m):
            continue
        try:
            graph = _trace(m)
        except Exception as err:  # any failure means "not traceable"
            untraced[name] = f"{type(err).__name__}: {err}"
            continue
        sites = [(node, *site) for node in graph.nodes if (site := _site(m, node)) is not None]
        calls.update(id(m.get_submodule(n.target)) for n, _, _ in sites if n.op == "call_module")
        if sites:
            plans.append((m, graph, sites))
    to_rewrite = [
        (m, graph, sites)
        for m, graph, sites in plans
        if any(
            node.op != "call_module"
            or calls[id(m.get_submodule(node.target))] > 1
            or (inplace and any(_site_input(node) in n.all_input_nodes for n in _nodes_after(node)))
            for node, _, inplace in sites
        )
    ]
    mapping: dict[int, nn.Module] = {id(m): _rewrite(m, graph, sites, make) for m, graph, sites in to_rewrite}
    for m in model.modules():
        if (kind := _module_kind(m)) is not None:
            mapping[id(m)] = _build(kind, make)
    out = _swap_modules(model, mapping)
    present = {id(m) for m in out.modules()}
    sites_count = sum(id(u) in present for u in created)
    if sites_count == 0:
        raise ValueError(f"{NO_SITES_MSG}; activations found: {_activations(model)}")
    out.ct_sites = sites_count
    return out, untraced


_NOT_ACTIVATIONS = ("MultiheadAttention", "Softmax", "Softmax2d", "LogSoftmax", "Softmin")


def _is_activation(m: nn.Module) -> bool:
    """torch's element-wise activation modules, and library ones named like them (QuickGELU, GELUTanh)."""
    name = type(m).__name__
    if type(m).__module__ == "torch.nn.modules.activation":
        return name not in _NOT_ACTIVATIONS
    return re.search(r"(GELU|SiLU|Swish|Mish|ReLU|Sigmoid|Tanh)", name) is not None


def _activations(model: nn.Module) -> str:
    """The activation modules of `model` with their counts, e.g. 'GELU x12' (what CT cannot convert)."""
    found = Counter(type(m).__name__ for m in model.modules() if _is_activation(m))
    return ", ".join(f"{name} x{n}" for name, n in found.most_common()) or "none as modules (functional only)"


def _swap_modules(root: nn.Module, mapping: dict[int, nn.Module]) -> nn.Module:
    """Replace every occurrence of the modules keyed by id in `mapping` (the root included)."""
    root = mapping.get(id(root), root)
    seen = {id(root)}
    stack = [root]
    while stack:
        module = stack.pop()
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            new = mapping.get(id(child), child)
            if new is not child:
                module._modules[name] = new
            if id(new) not in seen:
                seen.add(id(new))
                stack.append(new)
    return root
