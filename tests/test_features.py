"""The frozen-feature store (rftbench.features): rows computed once per image and extractor, shared
across splits, seeds, methods and runs; bit-identical to computing in the run; damaged chunks
detected and recomputed; a size cap; a read-only cache."""
from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

from rftbench import features as F
from rftbench.classifier import Classifier, Normalize
from rftbench.data.base import Split, UInt8Images
from rftbench.data.folders import ImageFiles
from rftbench.features import FeatureStore, compute_features, dataset_keys, extractor_key, split_keys
from rftbench.methods.ct import apply_ct, set_beta
from rftbench.results import run_folder
from rftbench.run import execute
from rftbench.train import RunContext


def small_model(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Classifier(body, nn.Linear(8, 4), Normalize([0.5] * 3, [0.5] * 3)).eval()


def images(n: int, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split("pool", "train", x=torch.rand(n, 3, 12, 12, generator=g), y=torch.arange(n) % 4)


CTX = RunContext(eval_batch_size=16)
B = 16  # the store's fixed batch (features.batch_size)


def test_rows_are_computed_once_and_shared_by_subsets_seeds_and_stores(tmp_path):
    model, pool = small_model(), images(70)
    store = FeatureStore(tmp_path, batch_size=B)
    full = store.features(model, pool, CTX)
    assert torch.equal(full, compute_features(model, pool, CTX, B))
    assert store.counts == {"computed": 70, "reused": 0}
    # a seed's train/val split of the same images: nothing computed again, the same rows
    val = pool.subset(torch.tensor([3, 9, 40]))
    assert torch.equal(store.features(model, val, CTX), full[[3, 9, 40]])
    later = FeatureStore(tmp_path, batch_size=B)  # another run, same cache
    assert torch.equal(later.features(model, pool, CTX), full)
    assert later.counts == {"computed": 0, "reused": 70}
    assert later.records[0]["stored"] and later.records[0]["reused"] == 70
    # the chunks on disk are safetensors entries named by (extractor, transform, how)
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    desc = json.loads((entry / "entry.json").read_text())
    assert desc["extractor"] == extractor_key(model) and desc["batch_size"] == B


def test_a_row_does_not_depend_on_the_rows_it_was_computed_with(tmp_path):
    """Rows first computed for a scattered subset, then the rest: bit-identical to one pass in memory."""
    model, pool = small_model(), images(53)
    store = FeatureStore(tmp_path, batch_size=B)
    store.features(model, pool.subset(torch.tensor([50, 1, 17, 33, 8])), CTX)
    mixed = store.features(model, pool, CTX)
    assert store.counts["computed"] == 53 and store.counts["reused"] == 5
    assert torch.equal(mixed, FeatureStore(None, batch_size=B).features(model, pool, CTX))


def test_identical_images_share_one_row_and_keys_follow_content():
    pool = images(6)
    twice = Split("twice", "test", x=torch.cat([pool.x, pool.x[:2]]), y=torch.zeros(8, dtype=torch.long))
    keys = split_keys(twice)
    assert keys[6] == keys[0] and keys[7] == keys[1] and len(set(keys)) == 6
    store = FeatureStore(None, batch_size=B)
    out = store.features(small_model(), twice, CTX)
    assert store.counts["computed"] == 6 and torch.equal(out[6], out[0])


def test_the_extractor_key_follows_weights_structure_and_beta_not_the_head():
    model = small_model()
    key = extractor_key(model)
    model.head = nn.Linear(8, 2)  # a probed head: the same features
    assert extractor_key(model) == key
    assert extractor_key(small_model(seed=1)) != key  # other weights
    ct = apply_ct(small_model(), 0.8, 0.5, example_input=torch.rand(2, 3, 12, 12))
    k8 = extractor_key(ct)
    set_beta(ct, 0.9)
    assert extractor_key(ct) not in (k8, key)
    set_beta(ct, 0.8)
    assert extractor_key(ct) == k8


def test_file_keys_follow_path_size_and_mtime_and_unknown_datasets_are_not_stored(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((5, 5, 3), 40 * i, np.uint8)).save(p)
        paths.append(str(p))
    ds = ImageFiles([(p, 0) for p in paths])
    keys = dataset_keys(ds)
    assert len(set(keys)) == 3
    os.utime(paths[1], ns=(1, 1))
    assert dataset_keys(ds)[1] != keys[1] and dataset_keys(ds)[0] == keys[0]
    pixels = np.zeros((3, 4, 4, 3), np.uint8)
    pixels[2] = 7
    u = dataset_keys(UInt8Images(pixels, np.zeros(3)))
    assert u[0] == u[1] != u[2]

    class Opaque(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((3, 6, 6), i / 4.0), 0
    assert dataset_keys(Opaque()) is None
    store = FeatureStore(tmp_path / "store", batch_size=B)
    split = Split("opaque", "test", dataset=Opaque())
    out = store.features(small_model(), split, CTX)
    assert out.shape == (4, 8) and store.records[0]["stored"] is False
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_chunk_is_detected_reported_and_recomputed(tmp_path, caplog, damage):
    model, pool = small_model(), images(40)
    good = FeatureStore(tmp_path, batch_size=B).features(model, pool, CTX)
    (chunk,) = tmp_path.rglob("chunk-*.safetensors")
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[-20:-10] = bytes(b ^ 0xFF for b in data[-20:-10])  # inside the feature values
    else:
        data = data[:30]
    chunk.write_bytes(bytes(data))
    store = FeatureStore(tmp_path, batch_size=B)
    with caplog.at_level(logging.WARNING, logger="rftbench"):
        again = store.features(model, pool, CTX)
    assert torch.equal(again, good)
    assert store.counts["damaged"] == 1 and store.counts["computed"] == 40
    assert str(chunk) in caplog.text
    assert not chunk.exists()  # deleted; a fresh intact chunk replaces it
    assert FeatureStore(tmp_path, batch_size=B).features(model, pool, CTX).equal(good)


def test_the_size_cap_evicts_the_least_recently_used_entries(tmp_path):
    pool = images(64)
    store = FeatureStore(tmp_path, max_gb=1.0, batch_size=B)
    store.features(small_model(0), pool, CTX)
    one = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".lock")
    store.max_bytes = 2.5 * one  # room for two entries
    for seed in (1, 2):
        store.features(small_model(seed), pool, CTX)
    assert store.counts["evicted"] >= 1
    left = [p.name for p in tmp_path.iterdir() if p.is_dir()]
    assert len(left) == 2 and F.entry_key(small_model(2), pool, CTX, B)[0] in left  # the newest stays
    assert F.entry_key(small_model(0), pool, CTX, B)[0] not in left


def test_an_unwritable_store_computes_in_memory_and_warns(tmp_path, monkeypatch, caplog):
    from rftbench import utils

    def refuse(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(utils, "save_tensors_atomic", refuse)
    store = FeatureStore(tmp_path, batch_size=B)
    model, pool = small_model(), images(20)
    with caplog.at_level(logging.WARNING, logger="rftbench"):
        out = store.features(model, pool, CTX)
        assert torch.equal(store.features(model, pool, CTX), out)  # kept in memory for the run
    assert "not writable" in caplog.text and not list(tmp_path.rglob("*.safetensors"))
    assert store.counts == {"computed": 20, "reused": 20}


def test_logits_are_the_head_on_the_stored_features():
    model, pool = small_model(), images(30)
    model.head = nn.Linear(8, 4)
    with torch.no_grad():
        expected = model(pool.x)
    assert torch.allclose(FeatureStore(None, batch_size=B).logits(model, pool, CTX), expected, atol=1e-6)


def test_features_keys_are_validated(make_cfg):
    from rftbench.validate import ConfigError, validate_config

    with pytest.raises(ConfigError, match="features.max_gb must be a number > 0"):
        validate_config(make_cfg("features.max_gb=0"))
    with pytest.raises(ConfigError, match="unknown key features.cap"):
        validate_config(make_cfg("+features.cap=1"))
    with pytest.raises(ConfigError, match="features.store must be true or false"):
        validate_config(make_cfg("features.store=maybe"))


def _metrics(path: Path) -> pd.DataFrame:
    m = pd.read_csv(path / "metrics.csv")
    return m[~m.metric.str.contains("time|per_s")].reset_index(drop=True)


def test_a_three_seed_ct_sweep_and_lp_compute_each_betas_features_once_and_match_the_store_off(make_cfg, tmp_path):
    """The issue's check: 3 seeds of ct (2 betas + ReLU) and lp on digits with the whole training pool
    (the seed only moves the val split): seeds 1 and 2 compute no train/val/test rows, every
    (extractor, image) is computed once over all runs, and the metrics of runs that reused stored rows
    equal those of the same runs with the store switched off."""
    cache = tmp_path / "cache"
    common = ["suite.build.train_per_class=null", f"paths.cache={cache}", "tracking.enabled=false",
              "eval.adversarial.enabled=false"]

    def run(method: str, seed: int, store: str) -> Path:
        grid = ["method.betas.values=[0.8,0.9]"] if method == "ct" else []
        cfg = make_cfg(*common, *grid, f"method={method}", f"seed={seed}", f"features.store={store}",
                       f"paths.runs={tmp_path / store}")
        assert execute(cfg) == "done"
        return run_folder(cfg).path

    stored = {(m, s): run(m, s, "true") for m in ("ct", "lp") for s in (0, 1, 2)}
    for method, seed in (("ct", 1), ("lp", 2)):  # runs that reused every row they read
        pd.testing.assert_frame_equal(_metrics(stored[method, seed]), _metrics(run(method, seed, "false")))
    computed: dict[str, int] = {}
    for (method, seed), folder in stored.items():
        for r in json.loads((folder / "features.json").read_text())["requests"]:
            if seed > 0 and r["split"] in ("train", "val", "test"):
                assert r["computed"] == 0, (method, seed, r)
            computed[r["entry"]] = computed.get(r["entry"], 0) + r["computed"]
    # 3 CT entries (beta 0.8, 0.9, 1.0) + lp's plain body; each image computed once per entry
    entries = [p for p in (cache / "features").iterdir() if p.is_dir()]
    assert len(entries) == 4
    for entry in entries:
        keys = []
        for chunk in entry.glob("chunk-*.safetensors"):
            with safe_open(str(chunk), "pt") as f:
                keys += [bytes(k) for k in f.get_tensor("keys").numpy()]
        assert len(keys) == len(set(keys)) == computed[entry.name]


def test_entries_record_what_they_were_made_for_and_plan_finds_them(tmp_path):
    from dataclasses import replace

    from rftbench.features import entries_for

    backbone = {"name": "small", "arch": "conv", "checkpoint": None}
    ctx = replace(CTX, spec={"backbone": backbone, "suite": {"name": "digits"}, "seed": 0})
    FeatureStore(tmp_path, batch_size=B).features(small_model(), images(10), ctx)
    (found,) = entries_for(tmp_path, backbone, "digits")
    assert found["backbone"] == "small" and found["bytes"] > 10 * 8 * 4
    assert entries_for(tmp_path, {**backbone, "checkpoint": "other.pt"}, "digits") == []
    assert entries_for(tmp_path, backbone, "cifar10") == []


def test_the_weights_are_hashed_again_only_when_they_change(monkeypatch):
    calls = []
    real = F.state_digest
    monkeypatch.setattr(F, "state_digest", lambda state: calls.append(1) or real(state))
    store, model, pool = FeatureStore(None, batch_size=B), small_model(), images(8)
    first = store.features(model, pool, CTX)
    store.features(model, pool.subset(torch.tensor([1, 2])), CTX)
    assert len(calls) == 1
    with torch.no_grad():
        model.body[0].weight.add_(1.0)  # an in-place change: another extractor
    assert not torch.equal(store.features(model, pool, CTX), first) and len(calls) == 2
