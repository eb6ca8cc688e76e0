"""The README's Python API examples run as written (tiny random-initialised models, offline)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_api_examples():
    assert len(BLOCKS) >= 2 and any("apply_lora" in b and "LEVI" in b for b in BLOCKS)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, single_thread):
    exec(compile(code, str(README), "exec"), {})


def test_lora_and_levi_take_a_plain_torchvision_model_and_keep_it(single_thread):
    from rftbench.methods.levi import LEVI
    from rftbench.methods.lora import apply_lora

    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.rand(2, 3, 32, 32)
    before = plain(x)
    lora = apply_lora(plain).eval()
    assert torch.allclose(lora(x), before, atol=1e-5)  # same function at initialisation (B = 0)
    assert isinstance(plain.fc, torch.nn.Linear)  # the caller's model is not modified
    levi = LEVI(plain, num_classes=3, input_size=(3, 32, 32), max_task_ratio=None)
    assert levi(x).shape == (2, 3)
    with pytest.raises(ValueError, match="cannot find the linear classifier"):
        apply_lora(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()))
