"""python -m rftbench.data verify suite=<s> [paths.data=...]   |   download suite=<s>

Composes the same config as `rftbench.run` (so `paths.data`, `$RFTBENCH_DATA` and suite overrides
apply) and checks or downloads that suite's data. `verify` exits 1 when a part is missing or incomplete.
"""
from __future__ import annotations

import sys

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rftbench.data.verify import download, verify

USAGE = "usage: python -m rftbench.data {verify,download} suite=<suite> [config overrides]"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("verify", "download"):
        print(USAGE, file=sys.stderr)
        return 2
    from rftbench.identity import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=argv[1:])
    suite = OmegaConf.to_container(cfg.suite, resolve=True)
    if argv[0] == "download":
        for line in download(suite):
            print(line)
        return 0
    checks = verify(suite)
    print(f"suite {suite['name']}:")
    for c in checks:
        print(c.line())
    bad = [c for c in checks if c.status != "found"]
    unsorted = sum(c.status == "unsorted" for c in bad)
    print(f"{len(checks) - len(bad)} found, {sum(c.status == 'missing' for c in bad)} missing, "
          f"{sum(c.status == 'incomplete' for c in bad)} incomplete" + (f", {unsorted} unsorted" if unsorted else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
