"""Small shared helpers: seeding, devices, hashing, the artifact cache, atomic writes."""
from __future__ import annotations

import errno
import functools
import hashlib
import inspect
import json
import logging
import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: what SLURM or taskset granted)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def apply_threads(threads: int | None, parallel_jobs: int = 1) -> int:
    """Set every CPU thread pool a run uses to `threads` (None: the available cores divided among
    `parallel_jobs` jobs sharing the machine) and return the number: PyTorch's intra-op pool, its
    inter-op pool (settable once per process), the BLAS/OpenMP pools of NumPy/SciPy (threadpoolctl),
    OpenCV's, and OMP_NUM_THREADS for child processes (DataLoader workers)."""
    if threads is None:
        threads = max(1, available_cores() // max(1, int(parallel_jobs)))
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer or null (all available cores), got {threads!r}")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set, or inter-op work already started in this process
        pass
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)
    try:
        import cv2

        cv2.setNumThreads(threads)
    except ImportError:
        pass
    return threads


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device {name!r} not valid; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} requested but CUDA is not available; use device=auto or cpu")
    return torch.device(name)


F = TypeVar("F", bound=Callable)


def config_target(config_key: str) -> Callable[[F], F]:
    """Mark a function as the `_target_` of the config node `config_key` (e.g. "suite.build"): a
    call whose keywords do not fit its signature (a typo, a missing key) fails with one error naming
    the node and listing its valid keys. The signature stays visible to `inspect.signature`."""

    def wrap(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            try:
                signature.bind(*args, **kwargs)
            except TypeError as err:
                valid = ", ".join(signature.parameters)
                raise TypeError(f"{config_key} ({fn.__module__}.{fn.__qualname__}): {err}; valid keys: {valid}") from None
            return fn(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return wrap


def describe(obj: Any) -> Any:
    """A JSON-able, address-free description of config values, including instantiated partials
    (`functools.partial(torch.optim.SGD, lr=...)` -> {"_target_": "torch.optim.sgd.SGD", "lr": ...})."""
    func = getattr(obj, "func", None)
    if func is not None and hasattr(obj, "keywords"):
        return {"_target_": f"{func.__module__}.{func.__qualname__}", "args": describe(list(obj.args)),
                **{k: describe(v) for k, v in obj.keywords.items()}}
    if isinstance(obj, dict):
        return {str(k): describe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [describe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"{obj.__module__}.{obj.__qualname__}"
    return str(obj)


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short sha256 of an object's `describe` (keys sorted): same content -> same hash."""
    blob = json.dumps(describe(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def _hash_tensor(h: "hashlib._Hash", t: torch.Tensor) -> None:
    """Feed a tensor's shape, dtype and bytes to `h` (the one tensor hashing routine)."""
    t = t.detach().cpu().contiguous()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def tensor_digest(*tensors: torch.Tensor, length: int = 16) -> str:
    """A short sha256 of tensors' shapes, dtypes and values, in order."""
    h = hashlib.sha256()
    for t in tensors:
        _hash_tensor(h, t)
    return h.hexdigest()[:length]


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """The full sha256 of a state dict's keys, shapes, dtypes and values (key order ignored)."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(f"{key}|".encode())
        _hash_tensor(h, state[key])
    return h.hexdigest()


def missing_file(path: str | Path, what: str, how: str) -> FileNotFoundError:
    """The error for a file or folder the user must provide: what, where it was expected, how to get it."""
    return FileNotFoundError(f"{what} not found: expected {path}. {how}")


def file_in_the_way(folder: str | Path) -> Path | None:
    """`folder` itself or its nearest existing ancestor when that is not a directory (a regular file
    where a folder must be), else None."""
    folder = Path(folder).expanduser()
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def cache_root() -> Path:
    """Content-addressed artifact cache: $RFTBENCH_CACHE, default ~/.cache/rftbench."""
    root = Path(os.environ.get("RFTBENCH_CACHE", Path.home() / ".cache" / "rftbench"))
    blocker = file_in_the_way(root)
    if blocker is not None:
        what = "a file" if blocker == root else f"under the file {blocker}"
        raise NotADirectoryError(f"the cache folder $RFTBENCH_CACHE = {root} is {what}; point it at a directory")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def file_lock(path: str | Path) -> Iterator[bool]:
    """Hold an exclusive advisory lock on `path` (created if needed) while the block runs, so that
    concurrent jobs compute a shared cache entry once (the others wait, then read it). Yields whether
    the lock is held: where it cannot be taken (a read-only cache, a file system without locks) the
    block runs unlocked."""
    import fcntl

    try:
        handle = open(path, "a")
    except OSError:
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path in the same folder; on success it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_tensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


DIGEST_KEY = "rftbench_sha256"  # safetensors metadata key: the content digest of a cache entry
_warned: set[str] = set()


def _content_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted (name, shape, dtype, bytes) of every tensor."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + b"\0")
        h.update(tensor_digest(tensors[name]).encode())
    return h.hexdigest()


UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)


def cache_unwritable(folder: str | Path, exc: OSError) -> None:
    """Warn once per folder that the cache cannot be written (a read-only shared cache, a full disk):
    what was computed is used, not stored."""
    folder = str(folder)
    if folder not in _warned:
        _warned.add(folder)
        logging.getLogger("rftbench").warning(
            "cache folder %s is not writable (%s): computing without storing (the run goes on; later runs "
            "compute it again)", folder, exc.strerror or exc)


def save_cached(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bool:
    """A cache entry: `tensors` written atomically with their content digest in the metadata, so
    that `load_cached` can tell an intact entry from a truncated or garbled one. Returns False (after
    one warning per folder) when the cache cannot be written."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(path, tensors, {**(metadata or {}), DIGEST_KEY: _content_digest(tensors)})
    except OSError as exc:
        if exc.errno not in UNWRITABLE:
            raise
        cache_unwritable(Path(path).parent, exc)
        return False
    return True


def load_cached(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(tensors, metadata) of a `save_cached` entry; None when there is none. An entry that cannot be
    read, or whose content does not match its digest, is corrupt: it is named in one warning and
    deleted, and None tells the caller to rebuild it."""
    from safetensors.torch import load_file
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
        digest = metadata.get(DIGEST_KEY)
        problem = (None if digest == _content_digest(tensors) else "content digest mismatch" if digest
                   else "no content digest")
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled headers
        problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:
        if str(path) not in _warned:
            _warned.add(str(path))
            logging.getLogger("rftbench").warning("corrupt cache entry %s (%s): deleted, rebuilding it",
                                                  path, problem)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # a read-only cache: leave it, rebuild in memory
            cache_unwritable(Path(path).parent, exc)
        return None
    metadata.pop(DIGEST_KEY)
    return {k: v.to(device) for k, v in tensors.items()}, metadata


def seeded(transform: Callable | None, x, seed: int | None):
    """`transform(x)`, under `torch.manual_seed(seed)` when a seed is given (the CPU generator only,
    restored after: the per-image seeded augmentation); `x` unchanged without a transform."""
    if transform is None:
        return x
    if seed is None:
        return transform(x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(x)
