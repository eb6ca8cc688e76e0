"""rftbench: a reproducible benchmark suite for robust fine-tuning."""
import os

# OpenMP threads (PyTorch's CPU pools) yield instead of spin-waiting when the cores are shared with
# other processes: spinning made a run up to 5x slower beside one busy process. Read by OpenMP when
# torch loads it, so it is set here, before any rftbench module imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
