"""Streaming speed: images/s of the runner's evaluation path vs a bare ImageFolder + DataLoader loop.

Generates an ImageFolder tree of JPEGs (ImageNet-like sizes), then evaluates a ResNet-50 at 224 px
(timm, random weights) over it twice: through `rftbench` (suite split + evaluation transform of the
backbone's input spec + `rftbench.train.predict`, DataLoader workers) and through
`torchvision.datasets.ImageFolder` + `DataLoader` with the same resize/crop and workers. Prints both
rates and their ratio (target >= 0.95: decoding through rftbench costs nothing extra).

    python scripts/bench_loader.py [--images 256] [--workers auto] [--batch-size 64] [--tree DIR]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image


def make_tree(root: Path, n: int, classes: int = 8, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = int(rng.integers(300, 500)), int(rng.integers(350, 500))
        # smooth random content compresses like a photograph, unlike white noise
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(folder / f"img_{i}.JPEG", quality=90)


def rftbench_rate(root: Path, model, workers: int, batch_size: int) -> float:
    from rftbench.backbones import input_spec
    from rftbench.data.base import Split
    from rftbench.data.folders import ImageFiles, class_folders
    from rftbench.train import RunContext, predict
    from rftbench.transforms import eval_transform

    index = {p.name: i for i, p in enumerate(sorted(root.iterdir()))}
    spec = input_spec({"source": "timm", "arch": "resnet50", "input": None})
    split = Split("test", "test", dataset=ImageFiles(class_folders(root, index)),
                  transform=eval_transform({"name": "center_crop"}, spec))
    ctx = RunContext(eval_batch_size=batch_size, num_workers=workers)
    t0 = time.perf_counter()
    predict(model, split, ctx)
    return len(split) / (time.perf_counter() - t0)


def bare_rate(root: Path, model, workers: int, batch_size: int) -> float:
    from torchvision.transforms import InterpolationMode, v2

    tf = v2.Compose([v2.ToImage(), v2.Resize(235, interpolation=InterpolationMode.BICUBIC, antialias=True),
                     v2.CenterCrop(224), v2.ToDtype(torch.float32, scale=True)])
    ds = torchvision.datasets.ImageFolder(str(root), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    return len(ds) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--workers", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tree", default=None, help="an existing ImageFolder tree (default: generate one)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating timed passes of each path")
    args = ap.parse_args()
    from rftbench.backbones import create_backbone
    from rftbench.run import resolve_workers

    workers = resolve_workers(args.workers if args.workers == "auto" else int(args.workers))
    model = create_backbone("resnet50", num_classes=1000).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.tree or tmp)
        if args.tree is None:
            make_tree(root, args.images)
        bare_rate(root, model, workers, args.batch_size)  # warm-up: page cache, kernels
        ours, bare = [], []
        for _ in range(args.repeats):
            ours.append(rftbench_rate(root, model, workers, args.batch_size))
            bare.append(bare_rate(root, model, workers, args.batch_size))
    o, b = max(ours), max(bare)
    print(f"images: {args.images}, workers: {workers}, threads: {torch.get_num_threads()}, cores: {os.cpu_count()}")
    print(f"rftbench path:        {o:8.1f} images/s")
    print(f"bare ImageFolder:     {b:8.1f} images/s")
    print(f"ratio: {o / b:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
