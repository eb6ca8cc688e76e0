"""The frozen-feature store: features of a frozen backbone computed once, shared by every run.

Frozen-backbone methods (`lp`, `ct`'s every beta, `ct_robust`'s sweep, `lpft`'s and `wise`'s probe
stage, `zeroshot`) and their evaluation need `model.features(x)` of the same images again and again:
for every beta, every trial seed (a seed only changes which images are held out as val), every
method and every test/OOD split. The store keeps them under `<paths.cache>/features/`:

- an **entry** per (feature extractor, evaluation transform, how it computes): the extractor is the
  digest of the normalisation + body weights and of the module structure (types, `extra_repr`, e.g.
  a CT unit's beta and coefficient, traced code, hooks); "how" is device type, autocast, batch size
  and torch version;
- inside an entry, one **row per image**, addressed by the image's own key (a file's path, size and
  mtime; an in-memory image's bytes), so that any split, seed, subset or fraction of the same images
  finds the rows it shares with earlier requests and computes only the others;
- rows live in chunk files of at most `CHUNK_ROWS` rows (safetensors, with the content digest of
  `rftbench.utils.save_cached`), written as extraction goes, so that an ImageNet train set is never
  held in memory while it is computed. A damaged chunk is named in a warning, deleted and its rows
  computed again.

Bit-identical to computing in the run: the rows are always computed in batches of exactly
`features.batch_size` images (the last batch padded with copies of its last image), so a row does not
depend on which other rows it was computed with on kernels whose per-image result does not depend on
the other images of a batch (tested on CPU; with the store switched off the run computes the same
way, in memory). A size cap (`features.max_gb`) evicts the least recently used entries; a read-only
cache is read and not written (one warning). `features.store=false` keeps everything in memory for
the one run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager, Protocol

import numpy as np
import torch
from torch import fx, nn

from rftbench.data.base import Split, UInt8Images, batches, scored_logits
from rftbench.pooling import inference_pooling
from rftbench.progress import bar
from rftbench.utils import (UNWRITABLE, cache_unwritable, file_lock, load_cached, save_cached, stable_hash,
                            state_digest)



class RunContext(Protocol):
    """What the store needs of a run's context (`rftbench.train.RunContext`, which imports this module)."""

    device: torch.device
    eval_batch_size: int
    num_workers: int
    spec: dict  # the run's resolved backbone + suite + seed (described in entry.json, not keyed)

    @property
    def cuda(self) -> bool: ...

    def autocast(self) -> ContextManager: ...

log = logging.getLogger("rftbench")
CHUNK_ROWS = 16384   # rows per chunk file (16384 x 2048 float32 = 128 MiB)
KEY_BYTES = 16       # an image key: blake2b digest size
FORMAT = 1           # bump when the layout or the computation changes
DEFAULT_BATCH = 128  # features.batch_size: the fixed batch rows are computed in


# ---- keys -------------------------------------------------------------------------------------

def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=KEY_BYTES).digest()


def _rows_keys(array: np.ndarray, tag: bytes) -> list[bytes]:
    """One key per leading-axis row of an array: its dtype, shape and bytes."""
    array = np.ascontiguousarray(array)
    head = tag + f"{array.dtype.str}{array.shape[1:]}".encode()
    flat = array.reshape(len(array), -1).view(np.uint8)
    return [_digest(head + row.tobytes()) for row in flat]


def _file_key(path: str | Path) -> bytes:
    """A file's key: its absolute path, size and modification time (content not read)."""
    path = os.path.abspath(path)
    st = os.stat(path)
    return _digest(f"file|{path}|{st.st_size}|{st.st_mtime_ns}".encode())


def dataset_keys(dataset) -> list[bytes] | None:
    """One key per item of a map-style dataset, read without decoding any image; None when the
    dataset's items cannot be identified (its features are then computed, never stored)."""
    from rftbench.data.base import image_files

    files = image_files(dataset)  # ImageFiles, torchvision datasets' file lists, subsets of them
    if files is not None:
        return [_file_key(path) for path in files]
    if hasattr(dataset, "indices") and hasattr(dataset, "dataset"):  # Subset, Indexed
        parent = dataset_keys(dataset.dataset)
        return None if parent is None else [parent[int(i)] for i in dataset.indices]
    if isinstance(dataset, UInt8Images):
        return _rows_keys(np.asarray(dataset.images), b"uint8|")
    n = len(dataset)
    data = getattr(dataset, "data", None)  # torchvision CIFAR/SVHN/MNIST: the pixels in memory
    if isinstance(data, (np.ndarray, torch.Tensor)) and len(data) == n:
        return _rows_keys(np.asarray(data), b"data|")
    return None


def split_keys(split: Split) -> list[bytes] | None:
    """The image keys of a split (computed once per split object)."""
    if "_feature_keys" not in vars(split):
        if split.in_memory:
            keys = _rows_keys(split.x.detach().cpu().numpy(), b"tensor|")
        else:
            keys = dataset_keys(split.dataset)
        split.__dict__["_feature_keys"] = keys
    return split.__dict__["_feature_keys"]


def extractor_key(model: nn.Module, weights_digest=state_digest) -> str:
    """The digest of what `model.features` computes: the weights and buffers of everything but the
    head (`weights_digest` of them), and the structure (module types, `extra_repr` such as a CT unit's
    beta, traced code, hooks)."""
    h = hashlib.sha256()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    h.update(weights_digest(state).encode())
    for name, m in model.named_modules():
        if name == "head" or name.startswith("head."):
            continue
        h.update(f"|{name}|{type(m).__module__}.{type(m).__qualname__}|{m.extra_repr()}".encode())
        if isinstance(m, fx.GraphModule):
            h.update(m.code.encode())
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            h.update(",".join(getattr(f, "__qualname__", repr(f)) for f in hooks.values()).encode())
    return h.hexdigest()


def entry_key(model: nn.Module, split: Split, ctx: RunContext, batch_size: int,
              extractor: str | None = None) -> tuple[str, dict]:
    """(entry folder name, its description): extractor (`extractor_key`, unless given), evaluation
    transform, how it computes."""
    desc = {"format": FORMAT, "extractor": extractor or extractor_key(model),
            "transform": "tensor" if split.in_memory else repr(split.transform),
            "device": ctx.device.type, "autocast": "bf16" if ctx.cuda else "none",
            "batch_size": batch_size, "torch": torch.__version__}
    if split.decoder is not None:  # suite.decode=cuda: other decoded pixels (rftbench.data.folders)
        desc["decode"] = split.decoder.device
    blob = json.dumps(desc, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24], {**desc, **about(ctx.spec)}


def about(spec: dict) -> dict:
    """What an entry was made for, for people and `--plan` (not part of its key): the backbone's
    name and config digest, the suite's name."""
    backbone, suite = spec.get("backbone") or {}, spec.get("suite") or {}
    return {"backbone": backbone.get("name"), "backbone_id": stable_hash(backbone) if backbone else None,
            "suite": suite.get("name")}


def entries_for(root: str | Path, backbone: dict, suite: str) -> list[dict]:
    """The store's entries made for this backbone config and suite: each entry.json with its `rows`
    and `bytes` on disk (`--plan` marks them)."""
    root, want = Path(root), stable_hash(backbone)
    out = []
    for desc_file in sorted(root.glob("*/entry.json")) if root.is_dir() else []:
        try:
            desc = json.loads(desc_file.read_text())
        except (OSError, ValueError):
            continue
        if desc.get("backbone_id") != want or desc.get("suite") != suite:
            continue
        chunks = list(desc_file.parent.glob("chunk-*.safetensors"))
        desc["bytes"] = sum(c.stat().st_size for c in chunks)
        out.append(desc)
    return out


# ---- computing --------------------------------------------------------------------------------

@torch.no_grad()
def batch_outputs(model: nn.Module, split: Split, ctx: RunContext, size: int, fn, label: str,
                  pad: bool = False) -> list[torch.Tensor]:
    """`fn(model, x)` of every batch of `size` images of `split`, in order, float32 on the CPU, the
    model in eval mode (its mode restored); with `pad`, a short last batch is filled up to `size` with
    copies of its last image (only its own rows are kept). The one inference loop of rftbench
    (`rftbench.train.predict` and the feature store)."""
    was_training = model.training
    model.eval()
    outs = []
    with inference_pooling(model):  # exact CPU max-pooling without argmax indices (rftbench.pooling)
        for xb, _ in bar(batches(split, size, num_workers=ctx.num_workers, device=ctx.device),
                         label, total=-(-len(split) // size), unit="batch"):
            n = len(xb)
            if pad and n < size:
                xb = torch.cat([xb, xb[-1:].expand(size - n, *xb.shape[1:])])
            if ctx.cuda:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with ctx.autocast():
                outs.append(fn(model, xb)[:n].float().cpu())
    model.train(was_training)
    return outs


def compute_features(model: nn.Module, split: Split, ctx: RunContext, size: int = DEFAULT_BATCH) -> torch.Tensor:
    """`model.features` of every image of `split`, in order, float32 on the CPU, in batches of exactly
    `size` images (the last padded with copies of its last image)."""
    outs = batch_outputs(model, split, ctx, size, lambda m, x: m.features(x), f"features {split.name}", pad=True)
    return torch.cat(outs) if outs else torch.zeros(0, model.num_features)


# ---- the store --------------------------------------------------------------------------------

@dataclass
class _Chunk:
    keys: list[bytes]
    path: Path | None = None                 # on disk (None: in memory only)
    feats: torch.Tensor | None = None        # in memory


@dataclass
class _Entry:
    name: str
    folder: Path | None
    desc: dict
    chunks: dict[str, _Chunk] = field(default_factory=dict)
    index: dict[bytes, tuple[str, int]] = field(default_factory=dict)
    bad: set[str] = field(default_factory=set)  # damaged chunks (kept out even where not deletable)

    def add(self, cid: str, chunk: _Chunk) -> None:
        self.chunks[cid] = chunk
        for row, key in enumerate(chunk.keys):
            self.index.setdefault(key, (cid, row))

    def drop(self, cid: str) -> None:
        self.chunks.pop(cid, None)
        self.index = {k: v for k, v in self.index.items() if v[0] != cid}
        for cid2, chunk in self.chunks.items():  # keys another chunk also holds come back
            for row, key in enumerate(chunk.keys):
                self.index.setdefault(key, (cid2, row))


class FeatureStore:
    """Rows of frozen features addressed by (entry, image key); `root=None` keeps them in memory.

    `counts` (the store's own counters): rows `computed` and `reused`, `damaged` chunks found,
    `evicted` entries; `records`: one dict per request (entry, split, rows, computed, reused, seconds),
    written by the runner to the run folder as `features.json`."""

    def __init__(self, root: str | Path | None = None, max_gb: float | None = None,
                 batch_size: int = DEFAULT_BATCH):
        self.root = Path(root) if root is not None else None
        self.batch_size = int(batch_size)
        self.max_bytes = None if max_gb is None else float(max_gb) * 2 ** 30
        self.writable = self.root is not None
        self.entries: dict[str, _Entry] = {}
        self.counts: Counter = Counter()
        self.records: list[dict] = []
        self._last_weights: tuple | None = None  # (signature, the tensors, digest) of the last weights hashed

    # -- public API

    def features(self, model: nn.Module, split: Split, ctx: RunContext) -> torch.Tensor:
        """`model.features` of every image of `split` (float32, CPU), rows shared through the store."""
        t0 = time.perf_counter()
        if len(split) == 0:
            return torch.zeros(0, model.num_features)
        keys = split_keys(split)
        if keys is None:  # images without identity: computed, not stored
            out = compute_features(model, split, ctx, self.batch_size)
            self._record("-", split, len(split), len(split), 0, t0, stored=False)
            return out
        name, desc = entry_key(model, split, ctx, self.batch_size, extractor_key(model, self._weights_digest))
        entry = self._entry(name, desc)
        computed, out = 0, None
        while out is None:  # a damaged chunk found while gathering: its rows are computed again
            if self._missing(entry, keys):
                computed += self._fill(entry, model, split, keys, ctx)
            out = self._gather(entry, keys)
        self._touch(entry)
        reused = len(keys) - computed
        self.counts["computed"] += computed
        self.counts["reused"] += reused
        self._record(name, split, len(keys), computed, reused, t0, stored=entry.folder is not None and self.writable)
        return out

    def logits(self, model: nn.Module, split: Split, ctx: RunContext) -> torch.Tensor:
        """`model(x)` of a frozen-backbone `Classifier` over `split` as `model.head` on the stored
        features, in batches of `ctx.eval_batch_size` (float32, CPU)."""
        feats = self.features(model, split, ctx)
        head = model.head
        outs = []
        with torch.no_grad():
            for start in range(0, len(feats), ctx.eval_batch_size):
                fb = feats[start:start + ctx.eval_batch_size].to(ctx.device)
                with ctx.autocast():
                    outs.append(head(fb).float().cpu())
        return torch.cat(outs) if outs else torch.zeros(0, head.out_features)

    def accuracy(self, model: nn.Module, split: Split, ctx: RunContext) -> float:
        """`rftbench.train.accuracy_on` of a frozen-backbone Classifier, from the stored features."""
        logits = scored_logits(self.logits(model, split, ctx), split)
        return (logits.argmax(1) == split.labels).float().mean().item()

    def summary(self) -> dict:
        return {"counts": dict(self.counts), "root": None if self.root is None else str(self.root),
                "requests": self.records}

    def _weights_digest(self, state: dict[str, torch.Tensor]) -> str:
        """`state_digest` of `state`, reused while the very same tensors are unchanged (the evaluation of
        a frozen model asks once per split: a ResNet-50 would be hashed ~80 times). The tensors are kept
        alive with the memo, so an address cannot be reused by other weights; `_version` counts every
        in-place change (optimizer steps, `load_state_dict`)."""
        signature = [(k, v.data_ptr(), v._version, v.dtype, tuple(v.shape)) for k, v in state.items()]
        if self._last_weights is not None and self._last_weights[0] == signature:
            return self._last_weights[2]
        digest = state_digest(state)
        self._last_weights = (signature, list(state.values()), digest)
        return digest

    # -- entries

    def _entry(self, name: str, desc: dict) -> _Entry:
        if name in self.entries:
            return self.entries[name]
        folder = self.root / name if self.root is not None else None
        entry = _Entry(name, folder, desc)
        if folder is not None:
            self._scan(entry)
        self.entries[name] = entry
        return entry

    def _scan(self, entry: _Entry) -> None:
        """Index the chunk files on disk that the entry does not know yet (other runs may add some)."""
        from safetensors import safe_open

        if entry.folder is None or not entry.folder.is_dir():
            return
        for path in sorted(entry.folder.glob("chunk-*.safetensors")):
            cid = path.stem
            if cid in entry.chunks or cid in entry.bad:
                continue
            try:
                with safe_open(str(path), "pt") as f:
                    keys = f.get_tensor("keys")
            except Exception as exc:  # truncated or garbled header: damaged
                self._damaged(entry, cid, path, f"{type(exc).__name__}: {exc}")
                continue
            entry.add(cid, _Chunk([bytes(r) for r in keys.numpy()], path=path))

    def _missing(self, entry: _Entry, keys: list[bytes]) -> list[int]:
        """Positions in `keys` of images the entry has no row for (one position per distinct key)."""
        seen: set[bytes] = set()
        out = []
        for i, k in enumerate(keys):
            if k not in entry.index and k not in seen:
                seen.add(k)
                out.append(i)
        return out

    def _fill(self, entry: _Entry, model: nn.Module, split: Split, keys: list[bytes], ctx: RunContext) -> int:
        """Compute the missing rows (under the entry's lock: concurrent runs compute them once) and
        store them as chunks. Returns how many rows this call computed."""
        lock = entry.folder.with_suffix(".lock") if entry.folder is not None and self.writable else None
        if lock is not None:
            try:
                lock.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                self._unwritable(exc)
                lock = None
        with (file_lock(lock) if lock is not None else nullcontext()):
            self._scan(entry)  # another run may have computed them meanwhile
            missing = self._missing(entry, keys)
            for start in range(0, len(missing), CHUNK_ROWS):
                part = missing[start:start + CHUNK_ROWS]
                feats = compute_features(model, split.subset(torch.tensor(part)), ctx, self.batch_size)
                self._write(entry, [keys[i] for i in part], feats)
        self._evict(keep=entry.name)
        return len(missing)

    def _write(self, entry: _Entry, keys: list[bytes], feats: torch.Tensor) -> None:
        cid = f"chunk-{uuid.uuid4().hex[:16]}"
        if entry.folder is not None and self.writable:
            path = entry.folder / f"{cid}.safetensors"
            meta = {"entry": json.dumps(entry.desc, sort_keys=True)}
            key_tensor = torch.from_numpy(np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, KEY_BYTES).copy())
            if save_cached(path, {"keys": key_tensor, "feats": feats}, meta):
                self._write_desc(entry)
                entry.add(cid, _Chunk(keys, path=path))
                return
            self.writable = False  # save_cached warned: a read-only or full cache
        entry.add(cid, _Chunk(keys, feats=feats))

    def _write_desc(self, entry: _Entry) -> None:
        desc = entry.folder / "entry.json"
        if not desc.exists():
            from rftbench.utils import write_text_atomic

            write_text_atomic(desc, json.dumps(entry.desc, indent=1, sort_keys=True))

    def _gather(self, entry: _Entry, keys: list[bytes]) -> torch.Tensor | None:
        """The rows of `keys`, in order; None when a chunk turned out damaged (its rows are dropped
        from the index: the caller computes them again)."""
        where = [entry.index[k] for k in keys]
        loaded: dict[str, torch.Tensor] = {}
        for cid in dict.fromkeys(c for c, _ in where):
            chunk = entry.chunks[cid]
            if chunk.feats is not None:
                loaded[cid] = chunk.feats
                continue
            got = load_cached(chunk.path)  # checks the content digest; warns and deletes when damaged
            if got is None or "feats" not in got[0]:
                self._damaged(entry, cid, chunk.path, "failed its digest check")
                return None
            loaded[cid] = got[0]["feats"]
        dim = next(iter(loaded.values())).shape[1]
        out = torch.empty(len(keys), dim)
        by_chunk: dict[str, tuple[list[int], list[int]]] = {}
        for pos, (cid, row) in enumerate(where):
            p, r = by_chunk.setdefault(cid, ([], []))
            p.append(pos)
            r.append(row)
        for cid, (pos, rows) in by_chunk.items():
            out[torch.tensor(pos)] = loaded[cid][torch.tensor(rows)]
        return out

    def _damaged(self, entry: _Entry, cid: str, path: Path | None, why: str) -> None:
        self.counts["damaged"] += 1
        if path is not None and path.exists():  # (else load_cached already named and deleted it)
            log.warning("feature store: damaged chunk %s (%s): deleted, its rows are computed again", path, why)
            try:
                path.unlink()
            except OSError as exc:
                self._unwritable(exc)
        entry.bad.add(cid)
        entry.drop(cid)

    # -- bookkeeping

    def _touch(self, entry: _Entry) -> None:
        """Mark the entry as used now (eviction removes the least recently used first)."""
        if entry.folder is not None and self.writable and (entry.folder / "entry.json").exists():
            try:
                os.utime(entry.folder / "entry.json")
            except OSError:
                pass

    def _evict(self, keep: str) -> None:
        """Remove least recently used entries until the store fits in `max_bytes` (never `keep`)."""
        if self.root is None or self.max_bytes is None or not self.writable or not self.root.is_dir():
            return
        sizes, used = {}, {}
        for folder in self.root.iterdir():
            if folder.is_dir():
                sizes[folder.name] = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
                stamp = folder / "entry.json"
                used[folder.name] = stamp.stat().st_mtime if stamp.exists() else 0.0
        total = sum(sizes.values())
        for name in sorted(used, key=used.get):
            if total <= self.max_bytes:
                break
            if name == keep:
                continue
            shutil.rmtree(self.root / name, ignore_errors=True)
            (self.root / f"{name}.lock").unlink(missing_ok=True)
            self.entries.pop(name, None)
            total -= sizes[name]
            self.counts["evicted"] += 1
            log.info("feature store: evicted entry %s (%.1f MiB) to stay under features.max_gb", name,
                     sizes[name] / 2 ** 20)

    def _unwritable(self, exc: OSError) -> None:
        if exc.errno not in UNWRITABLE:
            raise exc
        cache_unwritable(self.root, exc)
        self.writable = False

    def _record(self, name: str, split: Split, rows: int, computed: int, reused: int, t0: float,
                stored: bool) -> None:
        self.records.append({"entry": name, "split": split.name, "rows": rows, "computed": computed,
                             "reused": reused, "stored": stored, "seconds": round(time.perf_counter() - t0, 3)})
        log.info("features %s: %d rows, %d computed, %d reused (entry %s)", split.name, rows, computed, reused, name)

