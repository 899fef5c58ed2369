"""Results files and published numbers, read and checked for fewshot/tables.py.

A path given explicitly is read whatever its name; a folder is searched recursively for `results.json` and
`fold<f>_<k>shot.json` (the names tools/test_fold.py writes). A file must hold `miou`, `fbiou` (percent) and `protocol`
with the keys of REQUIRED_PROTOCOL; a missing key is an error naming the file and every missing key. The row label is
`method`, else `protocol.model`, with " (random init)" appended when `protocol.pretrained` is "none".

Published numbers (configs/published.yaml): `methods:` entries with their sources, and `num_folds:`, the fold count of
each dataset they name, so that a published row has one value per fold (a one-fold dataset's number is its mean).

Caveats. A result whose number is not a normal benchmark cell carries why (`Result.caveats`); fewshot.tables marks it
and the means it enters: `absent_classes` (classes of the fold without a test episode, left out of its mIoU:
fewshot.metrics) and `protocol.trained_classes_tested` (a checkpoint tested on classes it was trained on:
fewshot.preflight).
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .provenance import DATASET_FIELDS, FREE, REQUIRED

RESULT_NAME = re.compile(r"results\.json|fold\d+_\d+shot\.json")
# The fields a results file must hold (the dataset-specific ones only where they apply; num_folds: the evaluated
# dataset's fold count, from its source).
REQUIRED_PROTOCOL = (*REQUIRED, "num_folds", *DATASET_FIELDS["coco"])
NOT_APPLICABLE = {
    **{key: (lambda p, d=dataset: p.get("dataset") != d) for dataset, keys in DATASET_FIELDS.items() for key in keys},
    "min_pixels": lambda p: p.get("lists") == "hsnet",
}
# Protocol keys a published entry may record: the compared fields of REQUIRED_PROTOCOL, how supports were drawn and
# the sampler of its episodes (data.sampler: hsnet for HSNet's test loader, pfenet for PFENet's).
PUBLISHED_PROTOCOL = (*(k for k in REQUIRED_PROTOCOL if k not in FREE and k != "num_folds"), "support_draw", "sampler")


class TableError(ValueError):
    """Results or published numbers that cannot go into one table; the message names the file and the fix."""


@dataclass(frozen=True)
class Result:
    """One results file: a (method, dataset, shots, fold) cell."""

    path: Path
    label: str
    dataset: str
    shots: int
    fold: int
    miou: float
    fbiou: float
    miou_std: float | None
    seed_miou: dict[int, float]  # seed -> mIoU, from results["seeds"]
    protocol: dict[str, Any]
    caveats: tuple[str, ...] = ()  # why the number is not a normal cell (see Caveats above)


@dataclass(frozen=True)
class Published:
    """One published number: a method's mean mIoU (and folds when known) on a dataset at some shots."""

    name: str
    backbone: str
    dataset: str
    shots: int
    mean: float | None
    folds: tuple[float | None, ...]  # num_folds entries when the fold count is known, else ()
    fbiou: float | None
    protocol: dict[str, Any]
    source: str
    notes: str

    @property
    def label(self) -> str:
        return f"{self.name} ({self.backbone})" if self.backbone else self.name


# --------------------------------------------------------------------------------------------------------------------
# Reading.


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """Results files among `paths`: files as given, folders searched recursively for RESULT_NAME."""
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if path.is_file():
            found[path.resolve()] = None
        elif path.is_dir():
            hits = sorted(p for p in path.rglob("*.json") if RESULT_NAME.fullmatch(p.name))
            if not hits:
                raise TableError(f"no results.json or fold<f>_<k>shot.json under {path}; run tools/test_fold.py first")
            found.update((p.resolve(), None) for p in hits)
        else:
            raise TableError(f"results path {path} does not exist; pass results.json files or folders holding them")
    return list(found)


def _percent(value: Any, path: Path, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 100.0:
        raise TableError(f"{path}: {key}={value!r} is not a percentage in [0, 100]")
    return float(value)


def load_result(path: str | Path) -> Result:
    """Reads and checks one results.json; an error names the file and every missing key."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TableError(f"{path}: not a readable JSON results file ({err})") from err
    if not isinstance(data, dict):
        raise TableError(f"{path}: expected a JSON object with miou, fbiou and protocol, got {type(data).__name__}")
    proto = data.get("protocol")
    proto = proto if isinstance(proto, dict) else {}
    missing = [k for k in ("miou", "fbiou", "protocol") if k not in data]
    missing += [
        f"protocol.{k}"
        for k in REQUIRED_PROTOCOL
        if k not in proto and not (k in NOT_APPLICABLE and NOT_APPLICABLE[k](proto))
    ]
    if "method" not in data and "model" not in proto:
        missing.append("method")
    if missing:
        raise TableError(f"{path}: results file is missing {', '.join(missing)}; rewrite it with tools/test_fold.py")
    for key in ("num_folds", "fold", "shots"):
        if isinstance(proto[key], bool) or not isinstance(proto[key], int) or proto[key] < (key == "num_folds"):
            raise TableError(
                f"{path}: protocol.{key}={proto[key]!r} is not a valid integer (num_folds >= 1, others >= 0)"
            )
    if proto["fold"] >= proto["num_folds"]:
        raise TableError(f"{path}: protocol.fold={proto['fold']} does not exist for {proto['num_folds']} fold(s)")
    seeds = data.get("seeds") if isinstance(data.get("seeds"), list) else []
    seed_miou = {
        s["seed"]: float(s["miou"]) for s in seeds if isinstance(s, dict) and isinstance(s.get("miou"), int | float)
    }
    std = data.get("miou_std")
    caveats = []
    if data.get("absent_classes"):
        caveats.append(f"classes {data['absent_classes']} had no test episode: mIoU is over the fold's other classes")
    if proto.get("trained_classes_tested"):
        caveats.append(f"tested on classes {proto['trained_classes_tested']} the checkpoint was trained on")
    label = str(data.get("method") or proto["model"])
    if proto["pretrained"] == "none":
        label += " (random init)"
    return Result(
        path=path,
        label=label,
        dataset=str(proto["dataset"]),
        shots=proto["shots"],
        fold=proto["fold"],
        miou=_percent(data["miou"], path, "miou"),
        fbiou=_percent(data["fbiou"], path, "fbiou"),
        miou_std=float(std) if isinstance(std, int | float) else None,
        seed_miou=seed_miou,
        protocol=proto,
        caveats=tuple(caveats),
    )


def _check_keys(entry: Any, allowed: Sequence[str], required: Sequence[str], where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise TableError(f"{where}: expected a mapping, got {entry!r}")
    unknown = sorted(set(entry) - set(allowed))
    missing = [k for k in required if k not in entry]
    if unknown or missing:
        raise TableError(f"{where}: unknown keys {unknown}, missing keys {missing}; valid keys: {', '.join(allowed)}")
    return entry


def load_published(path: str | Path, only: Sequence[str] | None = None) -> list[Published]:
    """Published numbers from a YAML file shaped like configs/published.yaml.

    Args:
        only: method names ("HSNet") or labels ("HSNet (RN101)") to keep, case-insensitive; None keeps all.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise TableError(f"published numbers {path}: cannot read it as YAML ({err})") from err
    methods = (data or {}).get("methods") if isinstance(data, dict) else None
    if not isinstance(methods, list):
        raise TableError(f"{path}: expected a top-level 'methods:' list (see configs/published.yaml)")
    fold_counts = data.get("num_folds") or {}
    if not isinstance(fold_counts, dict) or not all(isinstance(n, int) and n >= 1 for n in fold_counts.values()):
        raise TableError(f"{path}: num_folds must map dataset names to fold counts >= 1, got {fold_counts!r}")
    out = []
    for i, method in enumerate(methods):
        where = f"{path}: methods[{i}]"
        keys = ("name", "backbone", "source", "notes", "protocol", "results")
        method = _check_keys(method, keys, ("name", "source", "results"), where)
        for j, res in enumerate(method["results"]):
            rkeys = ("dataset", "shots", "miou", "folds", "fbiou", "protocol", "backbone")
            res = _check_keys(res, rkeys, ("dataset", "shots"), f"{where} ({method['name']}).results[{j}]")
            out.append(_published(method, res, f"{where}.results[{j}]", fold_counts.get(res["dataset"])))
    if only:
        wanted = {name.lower() for name in only}
        valid = {p.name.lower() for p in out} | {p.label.lower() for p in out}
        unknown = [name for name in only if name.lower() not in valid]
        if unknown:
            names = sorted({p.name for p in out} | {p.label for p in out})
            raise TableError(f"unknown published method(s) {unknown} in {path}; choose from {names}")
        out = [p for p in out if p.name.lower() in wanted or p.label.lower() in wanted]
    return out


def _published(method: dict[str, Any], res: dict[str, Any], where: str, num_folds: int | None) -> Published:
    if isinstance(res["shots"], bool) or not isinstance(res["shots"], int) or res["shots"] < 0:
        raise TableError(f"{where}: shots={res['shots']!r} must be an integer >= 0 (0 for zero-shot)")
    protocol = {**(method.get("protocol") or {}), **(res.get("protocol") or {})}
    unknown = sorted(set(protocol) - set(PUBLISHED_PROTOCOL))
    if unknown:
        raise TableError(f"{where}: unknown protocol keys {unknown}; valid keys: {', '.join(PUBLISHED_PROTOCOL)}")
    mean = None if res.get("miou") is None else _percent(res["miou"], Path(where), "miou")
    folds = res.get("folds") or ([mean] if num_folds == 1 else [None] * (num_folds or 0))
    if not isinstance(folds, list) or (num_folds is not None and len(folds) != num_folds):
        raise TableError(
            f"{where}: folds must list the mIoU of the {num_folds} fold(s) of {res['dataset']} (null for an unknown "
            f"fold; the file's num_folds gives the count), got {folds!r}"
        )
    folds = [None if v is None else _percent(v, Path(where), "folds") for v in folds]
    if folds and None not in folds:
        fold_mean = statistics.fmean(folds)
        if mean is not None and abs(mean - fold_mean) > 0.1:
            raise TableError(f"{where}: miou={mean} is not the mean of folds {folds} ({fold_mean:.2f}); fix one")
        mean = fold_mean if mean is None else mean
    if mean is None:
        raise TableError(f"{where}: give miou (the mean over folds) or every fold")
    fbiou = None if res.get("fbiou") is None else _percent(res["fbiou"], Path(where), "fbiou")
    return Published(
        name=str(method["name"]),
        backbone=str(res.get("backbone", method.get("backbone", ""))),
        dataset=str(res["dataset"]),
        shots=res["shots"],
        mean=mean,
        folds=tuple(folds),
        fbiou=fbiou,
        protocol=protocol,
        source=str(method["source"]),
        notes=str(method.get("notes", "")),
    )
