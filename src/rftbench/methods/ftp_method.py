"""`method=ftp`: full fine-tuning with an FTP optimizer (FTPAdamW / FTPSGD), the head excluded
from the projection; the learned per-tensor radii gamma are saved with the run."""
from __future__ import annotations

from typing import Callable

import pandas as pd

from rftbench.backbones import Classifier
from rftbench.data.base import Suite
from rftbench.methods.base import Adapted
from rftbench.methods.ft import finetune
from rftbench.methods.ftp import FTPAdamW, FTPSGD
from rftbench.train import RunContext


def gammas(model: Classifier, optimizer: FTPAdamW | FTPSGD) -> pd.DataFrame:
    """Per constrained tensor: name, numel, gamma and the L1 row-distance bound it enforces."""
    rows = []
    for name, p in model.named_parameters():
        state = optimizer.state.get(p, {})
        if "gamma" in state:
            rows.append({"param": name, "numel": p.numel(), "gamma": float(state["gamma"]),
                         "max_row_l1_to_w0": float((p.detach() - state["anchor"]).abs()
                                                   .reshape(p.shape[0] if p.dim() > 1 else 1, -1).sum(1).max())})
    return pd.DataFrame(rows)


def adapt(model: Classifier, suite: Suite, ctx: RunContext, *, optimizer: Callable, epochs: int,
          batch_size: int, scheduler: dict | None = None, label_smoothing: float = 0.0) -> Adapted:
    """The fine-tuning recipe (`rftbench.methods.ft.finetune`) with an FTP optimizer; head excluded."""
    adapted, res = finetune(model, suite, ctx, checkpoint_key="ftp", exclude_head=True, optimizer=optimizer,
                            epochs=epochs, batch_size=batch_size, scheduler=scheduler,
                            label_smoothing=label_smoothing)
    if not isinstance(res.optimizer, (FTPAdamW, FTPSGD)):
        raise ValueError("method=ftp needs method.adapt.optimizer to be rftbench.methods.ftp.FTPAdamW or FTPSGD")
    table = gammas(model, res.optimizer)
    adapted.tables["gamma"] = table
    if len(table):  # no projected tensor (all excluded): no mean to report, rather than a NaN
        adapted.info["mean_gamma"] = float(table["gamma"].mean())
    return adapted
