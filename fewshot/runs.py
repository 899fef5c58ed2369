"""Run directories: one config per directory, logging set up once by the tools."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import yaml

from . import distributed
from .config import Config, ConfigError, dump_yaml, flatten, to_dict
from .io import write_text
from .provenance import git_revision

RESUMABLE_CHANGES = {"train.max_iters", "run.overwrite", "data.num_workers", "device"}


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines to stderr, from the main process only (called once by each tool's main)."""
    logging.basicConfig(
        level=level if distributed.is_main() else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def prepare_run_dir(cfg: Config, resume: bool) -> Path:
    """Creates `run.dir` and writes config.yaml, headed by the git revision; refuses a directory that holds a
    different config.

    A different config is accepted with `run.overwrite=true`; `--resume` accepts only changes that do not alter the
    training trajectory's definition (RESUMABLE_CHANGES, e.g. a longer train.max_iters).
    """
    run_dir = Path(cfg.run.dir)
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = flatten(yaml.safe_load(saved.read_text()) or {})
        new = flatten(to_dict(cfg))
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if resume:
            differ = [k for k in differ if k not in RESUMABLE_CHANGES]
            if differ:
                raise ConfigError(f"--resume: {saved} differs from this config in {differ}; resume with the same one")
        elif differ and not cfg.run.overwrite:
            raise ConfigError(
                f"run directory {run_dir} already holds a different config (differs in {differ[:8]}); pick another "
                "run.dir, add --resume, or pass run.overwrite=true"
            )
    elif resume:
        raise FileNotFoundError(f"--resume: {run_dir} holds no run (no config.yaml); start without --resume")
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(saved, f"# git revision: {git_revision()}\n{dump_yaml(cfg)}")
        if not resume:  # a fresh start: metrics of an earlier run in this directory would mix with the new ones
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    distributed.barrier()
    return run_dir
