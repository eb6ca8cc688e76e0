"""The CUDA path (`make test-gpu`; skipped without CUDA): training and evaluation under bf16 autocast +
channels_last against fp32 on the CPU, CT's units in float32 under autocast, AutoAttack on the GPU,
one job per GPU with launcher=joblib and the peak memory it records, the feature store on the GPU,
and the GPU lines of `make perf`.

Tolerances (bf16 keeps 8 mantissa bits, ~0.4% per rounding; products accumulate in float32):
- evaluation of the same weights: logits within 3% of the fp32 logits (relative Frobenius norm),
  the same predicted class on at least 97% of the images, accuracies within 3 points;
- a short training (3 epochs of SGD from the same start, the same batches): each epoch's mean train
  loss within 10% of fp32's, final val accuracy within 8 points.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from rftbench.backbones import create_backbone
from rftbench.data.base import Split, Suite
from rftbench.train import RunContext, fit, predict

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parents[1]
DIGITS_KWARGS = dict(channels=(32, 64, 128, 256), stem_width=16)
LOGIT_RTOL, AGREE, ACC_TOL = 0.03, 0.97, 0.03        # evaluation, same weights
LOSS_RTOL, VAL_TOL = 0.10, 0.08                      # short training


@pytest.fixture(scope="module")
def digits() -> dict[str, Split]:
    """scikit-learn's handwritten digits at 32 px: fixed train / val / test slices."""
    from rftbench.data.digits import handwritten_digits

    x, y = handwritten_digits(32)
    cut = {"train": (0, 480), "val": (480, 720), "test": (720, 1200)}
    return {name: Split(name, name, x=x[a:b], y=y[a:b]) for name, (a, b) in cut.items()}


def digits_model(seed: int = 0):
    torch.manual_seed(seed)
    return create_backbone("resnet10t", num_classes=10, kwargs=DIGITS_KWARGS)


def gpu_ctx(**kw) -> RunContext:
    return RunContext(device=torch.device("cuda"), eval_batch_size=128, **kw)


def trained_pair(digits: dict[str, Split]):
    """The same start trained 3 epochs on the CPU (fp32) and on the GPU (bf16 + channels_last)."""
    start = digits_model()
    sgd = partial(torch.optim.SGD, lr=0.02, momentum=0.9)
    out = {}
    for name, ctx in (("cpu", RunContext(eval_batch_size=128)), ("cuda", gpu_ctx())):
        model = ctx.prepare(copy.deepcopy(start))
        res = fit(model, digits["train"], digits["val"], ctx, optimizer=sgd, epochs=3, batch_size=32,
                  scheduler={"name": "cosine"}, checkpoint_key=None, select="last")
        out[name] = (model, res)
    return out


def test_training_under_bf16_channels_last_tracks_fp32(digits):
    conv_dtypes: list[torch.dtype] = []
    pair = trained_pair(digits)
    model, res = pair["cuda"]
    weights4d = [p for p in model.parameters() if p.dim() == 4]
    assert weights4d and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights4d)
    assert all(p.dtype == torch.float32 and p.is_cuda for p in model.parameters())  # bf16 compute, fp32 weights
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    hook = conv.register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype))
    predict(model, digits["val"], gpu_ctx())
    hook.remove()
    assert conv_dtypes and set(conv_dtypes) == {torch.bfloat16}  # autocast was on
    cpu_hist, gpu_hist = pair["cpu"][1].history, res.history
    for c, g in zip(cpu_hist, gpu_hist, strict=True):
        assert torch.isfinite(torch.tensor(g["train_loss"]))
        assert abs(g["train_loss"] - c["train_loss"]) <= LOSS_RTOL * c["train_loss"], (cpu_hist, gpu_hist)
    assert abs(gpu_hist[-1]["val_acc"] - cpu_hist[-1]["val_acc"]) <= VAL_TOL, (cpu_hist, gpu_hist)


def test_evaluation_under_bf16_channels_last_matches_fp32(digits, make_cfg):
    from rftbench.evaluate import evaluate

    model = digits_model()
    fit(model, digits["train"], digits["val"], RunContext(), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        epochs=2, batch_size=32, checkpoint_key=None)
    ctx = gpu_ctx()
    on_gpu = ctx.prepare(copy.deepcopy(model))
    ref, got = predict(model, digits["test"], RunContext()), predict(on_gpu, digits["test"], ctx)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and torch.isfinite(got).all()
    assert (got - ref).norm() <= LOGIT_RTOL * ref.norm()
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= AGREE
    test = digits["test"]
    flipped = Split("ood/flipped", "ood", "domain", x=test.x.flip(3), y=test.y)
    suite = Suite("digits", 10, {**digits, "ood/flipped": flipped})
    cfg = OmegaConf.to_container(make_cfg("eval.adversarial.enabled=false").eval, resolve=True)
    acc = {name: {(r["split"], r["metric"]): r["value"] for r in rows}
           for name, rows in (("cpu", evaluate(model, suite, RunContext(eval_batch_size=128), cfg)),
                              ("cuda", evaluate(on_gpu, suite, ctx, cfg)))}
    for split in ("test", "ood/flipped"):
        assert abs(acc["cuda"][(split, "acc")] - acc["cpu"][(split, "acc")]) <= ACC_TOL
        assert all(torch.isfinite(torch.tensor(acc["cuda"][(split, m)])) for m in ("ece", "nll"))


def test_ct_units_compute_in_float32_under_autocast(digits, monkeypatch):
    from rftbench.methods import ct
    from rftbench.methods.ct_method import probe_sweep

    seen: list[tuple[torch.dtype, bool]] = []
    plain = ct.ctu

    def recording(x, beta, coeff):
        seen.append((x.dtype, torch.is_autocast_enabled("cuda")))
        return plain(x, beta, coeff)

    monkeypatch.setattr(ct, "ctu", recording)
    ctx = gpu_ctx()
    model = ctx.prepare(digits_model()).eval()
    ct_model = ct.apply_ct(model, 0.8, 0.5, example_input=digits["train"].x[:2].cuda())
    logits = predict(ct_model, digits["test"], ctx)
    assert seen and set(seen) == {(torch.float32, False)}  # every CT site: float32, autocast off
    ref = predict(ct.apply_ct(digits_model().eval(), 0.8, 0.5), digits["test"], RunContext())
    assert torch.isfinite(logits).all() and (logits - ref).norm() <= LOGIT_RTOL * ref.norm()
    # near beta = 1, x / s ~ 1e10: overflows half precision, not float32; bf16 in -> bf16 out
    unit = ct.CTU(0.999999, 0.5)
    big = torch.tensor([1e4, -1e4, 3.0, -3.0, 0.0], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = unit(big.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.equal(out, unit(big.bfloat16().float()).bfloat16())
    assert torch.isfinite(out).all()
    suite = Suite("digits", 10, dict(digits))
    accs, _ = probe_sweep(ct_model, suite, ctx, [0.9, 1.0], ct_model.head, dict(epochs=2, batch_size=32))
    assert set(accs) == {0.9, 1.0} and all(0.0 <= a <= 1.0 for a in accs.values())


def test_autoattack_on_cuda_keeps_the_eps_ball_and_the_rng():
    from rftbench.attacks import attack

    model = digits_model().cuda().eval()
    torch.manual_seed(1)
    images = torch.rand(24, 3, 32, 32)
    with torch.no_grad():
        labels = model(images.cuda()).argmax(1).cpu()
    labels[:4] = (labels[:4] + 1) % 10
    inputs: list[torch.Tensor] = []
    hook = model.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    state = torch.cuda.get_rng_state()
    kw = dict(norm="Linf", eps=8 / 255, tier="quick", seed=0, n_iter=5, n_target_classes=2, batch_size=24,
              device="cuda")
    first = attack(model, images, labels, **kw)
    hook.remove()
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert all(x.is_cuda for x in inputs)
    adversarial = torch.cat([x.cpu() for x in inputs if len(x) > 1])
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    nearest = (adversarial[:, None] - images[None]).flatten(2).abs().amax(2).min(1).values
    assert nearest.max() <= 8 / 255 + 1e-6
    assert first.clean_acc == pytest.approx(20 / 24) and first.robust_acc <= first.clean_acc
    again = attack(model, images, labels, **kw)  # seeded: the same random starts (cuDNN may differ in the last bits)
    assert again.clean_acc == first.clean_acc and abs(again.robust_acc - first.robust_acc) <= 1 / 24 + 1e-9


def test_joblib_sweep_puts_one_job_per_gpu_and_records_peak_memory(tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "rftbench.run", "-m", "experiment=tiny", "launcher=joblib", "device=auto",
           "method=ft,lp", "seed=0", f"paths.runs={runs}", "tracking.enabled=false"]
    proc = subprocess.run(cmd, env={**os.environ, "HYDRA_FULL_ERROR": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = [p.parent for p in runs.glob("*/*/*/*/done")]
    assert len(folders) == 2
    n = torch.cuda.device_count()
    allowed = {"cuda"} if n < 2 else {f"cuda:{k}" for k in range(n)}
    for folder in folders:
        assert json.loads((folder / "env.json").read_text())["device"] in allowed
        metrics = pd.read_csv(folder / "metrics.csv")
        peak = metrics.loc[metrics.metric == "peak_mem_gb", "value"]
        assert len(peak) == 1 and 0 < peak.iloc[0] < torch.cuda.get_device_properties(0).total_memory / 2**30
        assert metrics.loc[metrics.metric == "acc", "value"].between(0, 1).all()


def test_feature_store_on_cuda_reuses_rows_exactly(digits, tmp_path):
    from rftbench.features import FeatureStore, compute_features

    ctx = gpu_ctx(store=FeatureStore(tmp_path / "features"))
    model = ctx.prepare(digits_model()).eval()
    first = ctx.store.features(model, digits["val"], ctx)
    again = FeatureStore(tmp_path / "features")  # a second run: reads the entry from disk
    second = again.features(model, digits["val"], gpu_ctx(store=again))
    assert torch.equal(first, second) and again.counts["computed"] == 0
    assert again.counts["reused"] == len(digits["val"])
    desc = json.loads(next((tmp_path / "features").glob("*/entry.json")).read_text())
    assert (desc["device"], desc["autocast"]) == ("cuda", "bf16")
    fresh = compute_features(model, digits["val"], ctx)
    assert fresh.dtype == torch.float32 and (fresh - first).abs().max() <= 1e-3 * first.abs().max()
    cpu = compute_features(digits_model().eval(), digits["val"], RunContext(eval_batch_size=128))
    assert (first - cpu).norm() <= LOGIT_RTOL * cpu.norm()


def test_perf_gpu_lines_measure_images_per_s_and_peak_memory():
    spec = importlib.util.spec_from_file_location("rftbench_perf_gpu", ROOT / "scripts" / "perf.py")
    perf = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = perf
    try:
        spec.loader.exec_module(perf)
        lines = perf.gpu_lines(perf.Settings.quick(reps=2))
    finally:
        sys.modules.pop(spec.name, None)
    assert [ln.key for ln in lines] == [*(f"gpu/{a}/{k}" for a in perf.GPU_ARCHS for k in ("train", "evaluate")),
                                        "gpu/decode"]
    for line in lines:
        assert line.skipped is None and len(line.ours) == len(line.bare) == 2 and line.ratio > 0
        assert line.peak_gb is not None and all(g > 0 for g in line.peak_gb)
        assert perf.row(line).count("|") == len(perf.COLUMNS) + 1
