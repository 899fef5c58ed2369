"""What produced a number: the code revision and the `protocol` record of every results.json, owned here.

A number is defined by its test episodes (dataset, fold, split, list convention, sampler, shots, episode count,
seeds, input resolution and scoring: `episode_fields`, which an exported episode file must match too) and by the
model that was scored (backbone, weights, head, shot fusion, checkpoint). `protocol_record(cfg, model)` builds the
record once for every tool: a model that is not described by `cfg.model` alone (a zero-shot model, a text head that
ignores the supports) says so through its `protocol_fields()`. `fewshot.tables` reads the field lists below to decide
what must agree within a table.

This module imports only the config (and, inside episode_fields, `episodes.evaluated`, which loads nothing more):
`episodes` and `fewshot.tables` use it without loading torch.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from .config import Config, DataConfig, to_dict

# Settings that define the test episodes of one seed (an episode file records these and must match them).
EPISODE_FIELDS = (
    "dataset", "fold", "split", "lists", "sampler", "shots", "ways", "episodes", "min_pixels", "novel_in_train",
    "train_list", "val_list", "list_dir", "resize", "image_size", "eval_resolution", "support_draw",
)  # fmt: skip
# Per-dataset settings, recorded only for their dataset: protocol name -> config path under `data`.
DATASET_FIELDS = {
    "coco": {"coco_split": "coco.split", "coco_crowd": "coco.crowd"},
    "folder": {"folder_binary": "folder.binary", "folder_folds": "folder.folds"},
    "fss1000": {"fss1000_classes": "fss1000.classes"},
}
# Fields every results file must hold for a table; the dataset-specific ones are checked where they apply (fields
# added later, such as support_draw and sampler, take their implied value in an older file: fewshot.tables.IMPLIED).
REQUIRED = (
    "dataset", "fold", "shots", "ways", "split", "lists", "episodes", "seeds", "min_pixels", "novel_in_train",
    "resize", "image_size", "eval_resolution", "pretrained", "backbone", "head",
)  # fmt: skip
# Fields that may differ between the cells of one table: the cell's position, the code revision, the evaluation
# autocast and the model's identity (which differs between rows by design). `pretrained` is not free: a table
# compares it as random ("none") versus real weights.
FREE = frozenset(
    {"dataset", "fold", "shots", "git", "amp", "method", "model", "backbone", "head", "shot_fusion", "checkpoint",
     "zeroshot", "trained_dataset", "trained_fold", "trained_classes_tested", "episode_file",
     "sam", "backbone_image_size", "gfsam", "persam_f", "kshot", "refine", "refine_sam"}  # SAM models' identity
)  # fmt: skip


def git_revision() -> str:
    """Short git revision of the code ("-dirty" with uncommitted changes; "unknown" outside a git checkout)."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


_QUERY_ORDER = {"coco": "class_uniform", "deepglobe": "class_cycle", "isic": "class_cycle", "chest_xray": "class_cycle"}


def query_order(dataset: str) -> str:
    """The published query order of a dataset: class_uniform for COCO (HSNet), class_cycle for Deepglobe, ISIC and
    Chest X-ray (PATNet, DMTNet: episode n of class n mod C), walk for the others."""
    return _QUERY_ORDER.get(dataset, "walk")


def episode_fields(data: DataConfig, seed: int) -> dict[str, Any]:
    """Every setting that defines the test episodes of `seed` (and the numbers scored on them), JSON-ready: those of
    the evaluated dataset (a cross-domain run's target, episodes.evaluated)."""
    from episodes import evaluated  # no torch: the package's front door imports lazily
    from episodes.official import SUPPORT_DRAW

    data = evaluated(data)
    fields: dict[str, Any] = {key: getattr(data, key) for key in EPISODE_FIELDS}
    fields["support_draw"] = SUPPORT_DRAW.get(data.sampler, data.support_draw)  # an official sampler draws its own way
    fields["seed"] = seed
    nested = to_dict(data)
    for name, path in DATASET_FIELDS.get(data.dataset, {}).items():
        group, key = path.split(".")
        fields[name] = nested[group][key]
    if data.sampler == "native":  # an official sampler's name says how it orders its queries
        fields["query_order"] = query_order(data.dataset)
    if data.dataset == "synthetic":
        from episodes.synthetic import VERSION  # numpy and PIL, no torch

        fields["synthetic"] = {**nested["synthetic"], "version": VERSION}  # another drawing is another dataset
    return json.loads(json.dumps(fields))


def checkpoint_fields(trained: DataConfig | None = None, tested: list[int] | None = None) -> dict[str, Any]:
    """Where a model's weights were trained: the checkpoint's dataset and fold (None without a checkpoint; "all" for a
    cross-domain run, trained on every class of its dataset), and the classes it was trained on that the run tested
    anyway (fewshot.preflight.check_trained_classes)."""
    fold = None if trained is None else ("all" if trained.target.dataset else trained.fold)
    return {
        "trained_dataset": None if trained is None else trained.dataset,
        "trained_fold": fold,
        "trained_classes_tested": list(tested or []),
    }


def episode_file_fields(data: DataConfig) -> dict[str, Any]:
    """data.episode_file, when one gives the episodes: its path and the sha256 of its bytes ({} otherwise)."""
    if not data.episode_file:
        return {}
    digest = hashlib.sha256(Path(data.episode_file).read_bytes()).hexdigest()
    return {"episode_file": str(data.episode_file), "episode_file_sha256": digest}


def protocol_record(
    cfg: Config,
    model: Any,
    checkpoint: str = "",
    trained: dict[str, Any] | None = None,
    num_folds: int | None = None,
) -> dict[str, Any]:
    """The `protocol` of a results record: the episodes of every seed in `data.seeds` (with the episode file and its
    sha256 when one is used), the evaluated dataset's fold count (`num_folds`, from its source: a table's mean is over
    that many folds), the model and its weights (`pretrained` normalised: "none" for random weights; `backbone_trained`
    when the checkpoint's backbone was trained with the head, `model.backbone.frozen: false`), the evaluation autocast,
    the checkpoint and where it was trained (`trained`: checkpoint_fields) and the code revision.
    `model.protocol_fields()`, when the model has it, overrides what `cfg.model` says."""
    from fewshot.backbones.weights import parse_weights

    record = episode_fields(cfg.data, cfg.data.seeds[0])
    del record["seed"]
    record["seeds"] = list(cfg.data.seeds)
    if num_folds is not None:
        record["num_folds"] = num_folds
    record.update(
        backbone=cfg.model.backbone.name,
        pretrained=str(parse_weights(cfg.model.backbone.pretrained)),
        backbone_trained=bool(checkpoint) and not cfg.model.backbone.frozen,  # then `pretrained` is where it started
        head=cfg.model.head,
        shot_fusion=cfg.model.shot_fusion,
        model=getattr(model, "identity", type(model).__name__),
        amp=cfg.eval.amp,
    )
    describe = getattr(model, "protocol_fields", None)
    if callable(describe):
        record.update(describe())
    record.update(episode_file_fields(cfg.data))
    record.update(checkpoint=checkpoint, **(trained or checkpoint_fields()), git=git_revision())
    return json.loads(json.dumps(record))


def zero_shot_benchmark_protocol(fields: dict[str, Any], pretrained: str) -> dict[str, Any]:
    """The `protocol` of a zero-shot benchmark result (tools/zero_shot_benchmark.py, fewshot.zeroshot.benchmarks):
    `fields` (the benchmark and its data, the preset with every setting, the backbone and model identity, seed) with
    `task`, the weights normalised as everywhere ("none" for random) and the code revision."""
    from fewshot.backbones.weights import parse_weights

    record = {"task": "zero_shot_benchmark", **fields, "pretrained": str(parse_weights(pretrained))}
    return json.loads(json.dumps({**record, "git": git_revision()}))
