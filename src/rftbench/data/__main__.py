"""python -m rftbench.data verify [--deep] suite=<s> [paths.data=...]   |   download suite=<s>

Composes the same config as `rftbench.run` (so `paths.data`, `$RFTBENCH_DATA` and suite overrides
apply) and checks or downloads that suite's data. `verify` exits 1 when a part is missing or incomplete;
`--deep` then builds the suite and decodes every image file of every split, listing each file that
cannot be read (with its split), exit 1 if any.
"""
from __future__ import annotations

import sys

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rftbench.data.verify import download, verify

USAGE = ("usage: python -m rftbench.data {verify,download} suite=<suite> [config overrides]   "
         "(verify --deep: also decode every image file)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("verify", "download"):
        print(USAGE, file=sys.stderr)
        return 2
    from rftbench.identity import CONFIG_DIR

    deep = "--deep" in argv[1:]
    overrides = [a for a in argv[1:] if a != "--deep"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
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
    if deep:
        return max(int(bool(bad)), deep_check(cfg, any(c.status == "missing" for c in bad)))
    return 1 if bad else 0


def deep_check(cfg, missing: bool) -> int:
    """Build the suite as a run does and decode every image file; 1 if any cannot be read."""
    from hydra.utils import call

    from rftbench.data.verify import unreadable_images

    if missing:
        print("deep check skipped: parts are missing (fix them first)")
        return 1
    suite = call(cfg.suite.build, seed=cfg.seed, cache_dir=str(cfg.paths.cache))  # the files a run reads
    bad, skipped = unreadable_images(suite)
    for split, path, why in bad:
        print(f"unreadable {split:<32} {path}  ({why})")
    if skipped:
        print(f"not decoded (in memory or not image files): {', '.join(skipped)}")
    print(f"deep check: {len(bad)} unreadable image file(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
