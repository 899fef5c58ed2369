"""Run directories: one run per directory, kept consistent across crashes, kills and preemptions.

A run directory holds `config.yaml` and the results of training (RESULTS). Starting over a directory that holds
results needs `--resume` (continue the run: its config may differ only in RESUMABLE_CHANGES) or `run.overwrite=true`
(start over: its results are deleted). Only the main process writes there; on start it removes the temporaries of
writes that a kill cut off, and a resume drops the metrics records of the steps it replays. Logging is set up once by
the tools.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

from . import distributed
from .config import Config, ConfigError, dump_yaml, flatten, to_dict
from .io import remove_stale_temporaries, write_text
from .provenance import git_revision

log = logging.getLogger(__name__)

# what a resume may change: where the run lives, and what does not define the training trajectory
RESUMABLE_CHANGES = {"train.max_iters", "run.dir", "run.overwrite", "data.num_workers", "device"}
RESULTS = ("metrics.jsonl", "last.pt", "best.safetensors")  # what training writes besides config.yaml


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines to stderr, from the main process only (called once by each tool's main)."""
    logging.basicConfig(
        level=level if distributed.is_main() else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def config_differences(stored: dict[str, Any] | None, cfg: Config, allowed: Collection[str] = ()) -> list[str]:
    """The dotted keys whose values differ between a stored config (a nested dict, as YAML reads it) and `cfg`,
    less those in `allowed`."""
    old, new = flatten(stored or {}), flatten(to_dict(cfg))
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in allowed)


def prepare_run_dir(cfg: Config, resume: bool) -> Path:
    """Creates `run.dir` and writes config.yaml there, headed by the git revision; refuses a directory whose run this
    one would damage.

    Without `--resume`, a directory holding results is refused unless `run.overwrite=true`, which deletes them; a
    directory holding only a config.yaml (a run that stopped before writing anything) is reused. `--resume` needs the
    same config up to RESUMABLE_CHANGES (e.g. a longer train.max_iters).
    """
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir={cfg.run.dir} is a file, not a directory; pick another run.dir")
    saved = run_dir / "config.yaml"
    held = [name for name in RESULTS if (run_dir / name).exists()]
    if resume:
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {run_dir} holds no run (no config.yaml); start without --resume")
        differ = config_differences(_read_config(saved), cfg, RESUMABLE_CHANGES)
        if differ:
            raise ConfigError(f"--resume: {saved} differs from this config in {differ}; resume with the same one")
    elif held and not cfg.run.overwrite:
        differ = config_differences(_read_config(saved), cfg) if saved.is_file() else ["(no config.yaml)"]
        what = f"a different config (differs in {differ[:8]})" if differ else "a run of this config"
        resumable = saved.is_file() and "last.pt" in held and all(k in RESUMABLE_CHANGES for k in differ)
        raise ConfigError(
            f"run directory {run_dir} already holds {what} and its results ({', '.join(held)}); "
            f"{'add --resume to continue it, ' if resumable else ''}pick another run.dir, or pass run.overwrite=true "
            "to start over (deleting them)"
        )
    if distributed.is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            removed = remove_stale_temporaries(run_dir)
            if not resume:  # a fresh start: results of an earlier run here would mix with the new ones
                for name in RESULTS:
                    (run_dir / name).unlink(missing_ok=True)
            write_text(saved, f"# git revision: {git_revision()}\n{dump_yaml(cfg)}")
        except OSError as err:
            raise ConfigError(f"run.dir={cfg.run.dir} cannot be written ({err}); pick another run.dir") from err
        if removed:
            log.info("removed temporaries of writes cut off by a kill in %s: %s", run_dir, ", ".join(removed))
    distributed.barrier()
    return run_dir


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML ({err}); fix it, or pass run.overwrite=true") from err


def check_resumable(stored: str, cfg: Config, path: Path) -> None:
    """Refuses to resume from a last.pt whose config (`stored`, YAML) differs from `cfg` beyond RESUMABLE_CHANGES."""
    differ = config_differences(yaml.safe_load(stored), cfg, RESUMABLE_CHANGES)
    if differ:
        raise ConfigError(
            f"--resume: {path} was trained with a different config (differs in {differ[:8]}): it belongs to another "
            "run (copied in, or left by an earlier run); resume with that run's config, or start over with "
            "run.overwrite=true"
        )


def truncate_metrics(path: Path, step: int) -> int:
    """Drops the records of `path` (metrics.jsonl) after `step`, atomically: a run resumed at `step` writes them
    again. A last line cut off by a kill mid-write goes too. Returns how many lines were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not line.endswith("\n"):
                break
            raise ValueError(f"{path}:{number} is not a JSON record ({err}); fix or delete that line") from err
        if not isinstance(record, dict) or record.get("step", 0) <= step:
            kept.append(line)
    if len(kept) < len(lines):
        write_text(path, "".join(kept))
    return len(lines) - len(kept)
