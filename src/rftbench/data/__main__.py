"""python -m rftbench.data verify [--deep] suite=<s> [paths.data=...]   |   download suite=<s>

Composes the same config as `rftbench.run` (so `paths.data`, `$RFTBENCH_DATA` and suite overrides
apply) and checks or downloads that suite's data. `verify` exits 1 when a part is missing or incomplete;
for the suites of image files (ImageNet, DomainNet), when no part is missing, it also builds the suite
and lists each empty or truncated image file with its split (the run's pre-flight check: size and
trailer, no decode). `--deep` instead decodes every image file of every split, listing each file that
cannot be read (with its split); both exit 1 if any.
"""
from __future__ import annotations

import sys

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from rftbench.data.verify import download, verify

IMAGE_FILE_SUITES = ("rftbench.data.imagenet.build_imagenet", "rftbench.data.domainnet.build_domainnet")
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
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    except HydraException as exc:  # a bad override or choice: one message, as the runner gives it
        print(f"Error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
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
    missing = any(c.status == "missing" for c in bad)
    unsorted = sum(c.status == "unsorted" for c in bad)
    damaged = 0 if deep or missing or cfg.suite.build._target_ not in IMAGE_FILE_SUITES else file_check(cfg)
    print(f"{len(checks) - len(bad)} found, {sum(c.status == 'missing' for c in bad)} missing, "
          f"{sum(c.status == 'incomplete' for c in bad)} incomplete" + (f", {unsorted} unsorted" if unsorted else "")
          + (f", {damaged} damaged image file(s)" if damaged else ""))
    if deep:
        return max(int(bool(bad)), deep_check(cfg, missing))
    return 1 if bad or damaged else 0


def build_suite(cfg, check: str):
    """The suite's splits as a run builds them (the files a run reads); None, after one line saying
    that `check` is skipped, when the builder refuses the tree (its part is listed above)."""
    from hydra.utils import instantiate

    try:
        return instantiate(cfg.suite.build, _partial_=True, _convert_="all")(seed=cfg.seed, cache_dir=str(cfg.paths.cache))
    except (FileNotFoundError, ValueError) as exc:  # incomplete, unsorted, or a foreign layout
        print(f"{check} skipped: the suite cannot be built: {exc}")
        return None


def file_check(cfg) -> int:
    """Print each empty or truncated image file of the suite with its split (size and trailer, as the
    run's pre-flight check `rftbench.data.preflight.damaged_images`); their number."""
    from rftbench.data.preflight import damaged_images

    suite = build_suite(cfg, "file check")
    bad = [] if suite is None else damaged_images(suite, cfg.paths.cache)
    for split, path, why in bad:
        print(f"damaged    {split:<32} {path}  ({why})")
    return len(bad)


def deep_check(cfg, missing: bool) -> int:
    """Build the suite as a run does and decode every image file; 1 if any cannot be read."""
    from rftbench.data.verify import unreadable_images

    if missing:
        print("deep check skipped: parts are missing (fix them first)")
        return 1
    suite = build_suite(cfg, "deep check")
    if suite is None:
        return 1
    bad, skipped = unreadable_images(suite)
    for split, path, why in bad:
        print(f"unreadable {split:<32} {path}  ({why})")
    if skipped:
        print(f"not decoded (in memory or not image files): {', '.join(skipped)}")
    print(f"deep check: {len(bad)} unreadable image file(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
