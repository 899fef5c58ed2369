"""Checks a test run makes before any work starts: its outputs can be written, and a checkpoint is not tested on the
classes it was trained on.

A checkpoint's training classes are the base classes of the fold it was trained on (`data.fold` of the config stored
in the checkpoint). Testing it on another fold of the same dataset tests it on some of those classes: a number that
measures memory, not few-shot transfer. fewshot.provenance.checkpoint_fields records the checkpoint's dataset and
fold in every results record, and the classes it was trained on that were tested anyway (an explicit choice,
`--allow-trained-classes` of tools/test_fold.py), so that fewshot.tables marks such a result.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from episodes.base import Source
from episodes.folds import coco_fold
from fewshot.config import DataConfig


def _unwritable(folder: Path) -> str | None:
    """Why no file can be created in `folder` (or, when it does not exist yet, in its nearest existing ancestor, where
    the folder would be made), or None when one can: found by creating and removing a probe file, which also holds
    for root and for read-only mounts, where permission bits mislead."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=existing)
    except OSError as err:
        return f"{existing} cannot be written ({err.strerror or err})"
    os.close(fd)
    os.unlink(probe)
    return None


def check_output_file(path: str | Path, what: str = "--out") -> None:
    """Raises ValueError naming `what` when `path` cannot be written as a file (a folder is there, or its folder
    cannot be made or written)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file name such as {path / 'results.json'}")
    reason = _unwritable(path.parent)
    if reason:
        raise ValueError(f"{what} {path} cannot be written: {reason}; choose another location")


def check_output_folder(path: str | Path, what: str = "--out") -> None:
    """Raises ValueError naming `what` when `path` cannot be used as an output folder (a file is there, or it cannot
    be made or written)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, but a folder is written there; give a folder")
    reason = _unwritable(path)
    if reason:
        raise ValueError(f"{what} {path} cannot be written: {reason}; choose another location")


def _same_classes(source: Source, trained: DataConfig) -> bool:
    """Whether the checkpoint's class ids name this source's classes: the same dataset, and for a folder dataset (whose
    classes are its sub-folders or classes.txt) the same root."""
    if trained.dataset != source.name:
        return False
    return source.name != "folder" or Path(trained.root).expanduser().resolve() == Path(source.root).resolve()


def trained_classes(source: Source, trained: DataConfig, checkpoint: str = "") -> list[int]:
    """Class ids of `source` that a checkpoint trained under `trained` (its stored data config) learned as
    foreground: the base classes of its fold, under its own COCO-20i split, or every class after a cross-domain run
    (data.target set: trained on all classes); [] for another dataset."""
    if not _same_classes(source, trained):
        return []
    if trained.target.dataset:
        return sorted(source.class_names)
    try:
        if source.name == "coco":
            return coco_fold(trained.fold, trained.coco.split)[0]
        return source.fold_classes(trained.fold)[0]
    except ValueError as err:
        where = f"{trained.dataset} fold {trained.fold}"
        raise ValueError(
            f"checkpoint {checkpoint} was trained on {where}, which this data does not have: {err}"
        ) from err


def check_trained_classes(
    source: Source, fold: int, trained: DataConfig, checkpoint: str, allow: bool = False
) -> list[int]:
    """The novel classes of `fold` that the checkpoint was trained on (sorted); ValueError naming them, the checkpoint
    and both folds when there are any, unless `allow`."""
    _, novel = source.fold_classes(fold)
    seen = sorted(set(novel) & set(trained_classes(source, trained, checkpoint)))
    if seen and not allow:
        names = ", ".join(f"{source.class_names.get(c, c)} ({c})" for c in seen)
        if trained.target.dataset:
            raise ValueError(
                f"checkpoint {checkpoint} was trained on every class of {trained.dataset} (a cross-domain run, "
                f"data.target set), fold {fold}'s novel classes {names} among them: test it on another dataset, or "
                "pass --allow-trained-classes to run anyway (the results then list them in "
                "protocol.trained_classes_tested and tables mark them)"
            )
        raise ValueError(
            f"checkpoint {checkpoint} was trained on {trained.dataset} fold {trained.fold}, whose base classes include "
            f"fold {fold}'s novel classes {names}: testing it there scores classes it was trained on. Test it on fold "
            f"{trained.fold}, give one checkpoint per fold with --checkpoint 'runs/x_fold{{fold}}/best.safetensors', "
            "or pass --allow-trained-classes to run anyway (the results then list them in "
            "protocol.trained_classes_tested and tables mark them)"
        )
    return seen
