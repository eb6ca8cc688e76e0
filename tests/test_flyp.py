"""FLYP: the loss is open_clip's ClipLoss, the head is the tuned towers' zero-shot head, both towers train."""
from __future__ import annotations

import random

import open_clip
import pandas as pd
import pytest
import torch
from open_clip.loss import ClipLoss

from rftbench import clip
from rftbench.data.base import Split, Suite
from rftbench.methods import flyp
from rftbench.run import build_model
from rftbench.train import RunContext

TINY = "RN-tiny-flyp"
TINY_CFG = {"embed_dim": 32, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
NAMES = ["cat", "dog", "airplane"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    from test_clip import register_tiny_clip

    return register_tiny_clip(tmp_path_factory, TINY, TINY_CFG)


def toy_suite() -> Suite:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(12, 3, 32, 32, generator=g), torch.arange(12) % 3
    suite = Suite("toy", 3, {"train": Split("train", "train", x=x, y=y), "val": Split("val", "val", x=x, y=y)},
                  meta={"upstream": "toy"})
    suite.class_names = list(NAMES)
    return suite


def tiny_model(make_cfg, tiny_clip):
    cfg = make_cfg("backbone=clip", f"backbone.arch={tiny_clip}", "backbone.pretrained_tag=null",
                   "backbone.pretrained=false", "backbone.input.size=32", experiment=None)
    torch.manual_seed(0)
    return build_model(cfg, toy_suite(), RunContext())


def test_loss_equals_open_clips_clip_loss(single_thread):
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    scale = torch.tensor(14.3)
    torch.testing.assert_close(flyp.clip_loss(img, txt, scale), ClipLoss()(img, txt, scale), rtol=0, atol=1e-6)
    # perfectly matched, well-separated pairs at a large scale: loss -> 0
    eye = torch.eye(4)
    assert flyp.clip_loss(eye, eye, torch.tensor(100.0)) < 1e-6


def test_captions_fill_a_random_template_with_the_class_name():
    templates = [lambda c: f"a {c}.", lambda c: f"the {c}!"]
    caps = flyp.captions([0, 2, 1, 0] * 25, NAMES, templates, random.Random(0))
    assert all(c in (f"a {NAMES[y]}.", f"the {NAMES[y]}!") for c, y in zip(caps, [0, 2, 1, 0] * 25))
    assert len(set(c[0] for c in caps)) == 2  # both templates drawn


def test_step_trains_both_towers_and_rebuilds_the_head(make_cfg, single_thread, tiny_clip):
    model = tiny_model(make_cfg, tiny_clip)
    parts = model.clip
    assert parts.model.visual is model.body.visual
    assert all(k.startswith(("normalize.", "body.", "head.")) for k in model.state_dict())  # no text tower
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    m = flyp.FLYPModel(model, parts, torch.device("cpu"), seed=0)
    m.train()
    opt = torch.optim.AdamW(parts.model.parameters(), lr=1e-3, weight_decay=0.1)
    x, y = toy_suite().train.x[:6], torch.tensor([0, 1, 2, 0, 1, 2])
    m.loss(x, y).backward()
    opt.step()
    after = parts.model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert {"visual", "transformer", "token_embedding", "logit_scale"} <= changed
    m.eval()  # rebuilds the head from the tuned text tower
    ref = clip.zeroshot_head(parts.model, tiny_clip, NAMES, parts.templates)
    torch.testing.assert_close(model.head.weight, ref.weight)
    torch.testing.assert_close(model.head.bias, ref.bias)


def test_refuses_a_backbone_without_text_tower(make_cfg, single_thread):
    cfg = make_cfg("method=flyp", "budget.epochs=1")
    assert cfg.backbone.name == "digits_resnet"
    from rftbench.backbones import Classifier
    from torch import nn
    plain = Classifier(nn.Flatten(), nn.Linear(4, 3), clip.Normalize([0.5] * 3, [0.5] * 3))
    with pytest.raises(ValueError, match=r"method=flyp.*backbone=clip\*"):
        flyp.adapt(plain, toy_suite(), RunContext(), optimizer=torch.optim.AdamW, epochs=1, batch_size=4,
                   scheduler=None)


def test_adapt_with_the_config_on_a_tiny_clip(make_cfg, single_thread, tiny_clip, tmp_path):
    """The configured recipe (configs/method/flyp.yaml) end to end on a named toy suite. (The digits
    suite of experiment=tiny declares no class names, so a runner-level run needs a named suite.)"""
    from hydra.utils import instantiate

    cfg = make_cfg("method=flyp", "budget.epochs=2", "budget.batch_size=6", "method.adapt.optimizer.lr=1e-3",
                   experiment=None)
    model, suite = tiny_model(make_cfg, tiny_clip), toy_suite()
    start = model.head.weight.clone()
    adapted = instantiate(cfg.method.adapt)(model, suite, RunContext(seed=0, cache_dir=tmp_path))
    assert len(adapted.tables["history"]) == 2 and adapted.info["best_epoch"] in (1, 2)
    assert adapted.trainable_params == sum(p.numel() for p in model.clip.model.parameters())
    assert not torch.equal(adapted.model.head.weight, start)  # the tuned towers' head
    ref = clip.zeroshot_head(model.clip.model, tiny_clip, NAMES, model.clip.templates)
    torch.testing.assert_close(adapted.model.head.weight, ref.weight)
    acc = (adapted.model(suite.val.x).argmax(1) == suite.val.y).float().mean().item()
    assert acc == pytest.approx(adapted.val_acc)


def test_flyp_runs_end_to_end_through_the_runner_on_digits(make_cfg, single_thread, tiny_clip):
    """`method=flyp` from the command-line config on the digits suite (its class names "0".."9") with
    a tiny random CLIP: done, evaluated, and the head is the tuned text tower's."""
    import json

    from rftbench.run import execute, run_folder

    cfg = make_cfg("method=flyp", "backbone=clip", f"backbone.arch={tiny_clip}", "backbone.pretrained_tag=null",
                   "backbone.pretrained=false", "backbone.input.size=32", "budget.epochs=1", "budget.batch_size=16",
                   "suite.build.train_per_class=5", "suite.build.typed.n=60", "suite.build.corruption.n=20",
                   "suite.build.corruption.names=[fog]", "suite.build.corruption.severities=[1]",
                   "suite.build.seen_corruptions.names=[]", "eval.adversarial.enabled=false", experiment=None)
    assert execute(cfg) == "done"
    path = run_folder(cfg).path
    m = pd.read_csv(path / "metrics.csv")
    assert {"test", "ood/corruption/fog/1"} <= set(m["split"])
    info = json.loads((path / "info.json").read_text())["info"]
    assert info["best_epoch"] == 1
