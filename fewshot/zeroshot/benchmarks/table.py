"""The training-free zero-shot table from benchmark results.json files (tools/zero_shot_benchmark.py).

Rows are (method, preset family, backbone, weights); columns the eight benchmarks in the published order, VOC21,
PC60, Object, VOC20, PC59, Stuff, City, ADE, and their Average (only when all eight are there), mIoU in percent.
A row's cells must come from one preset family (all official or all codebase) and one backbone and weights, so a
row is one model under one protocol; two files for one cell are an error naming both. A run on part of a benchmark
(--limit) is tabled with a mark and named in a note, and so is the average it enters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .datasets import BENCHMARKS, TABLE_ORDER

MARK = "†"


class ZeroShotTableError(ValueError):
    """Results that cannot go into the zero-shot table; the message names the file."""


def is_zero_shot_result(record: dict[str, Any]) -> bool:
    return record.get("protocol", {}).get("task") == "zero_shot_benchmark"


def _load(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ZeroShotTableError(f"cannot read results file {path}: {err}") from err
    if not is_zero_shot_result(record):
        raise ZeroShotTableError(f"{path} is not a zero-shot benchmark result (protocol.task != zero_shot_benchmark)")
    return record


def row_label(protocol: dict[str, Any]) -> str:
    """'naclip (ViT-B-16)' for official presets, 'sclip (ViT-B-16) [codebase]' for the codebase's settings."""
    family, _, _ = protocol["preset"].partition("/")
    backbone = protocol["backbone"].partition(":")[2] or protocol["backbone"]
    if family == "codebase":
        label = f"{protocol['settings']['method']} ({backbone}) [codebase]"
    else:
        label = f"{family} ({backbone})"
    return label + (" (random init)" if protocol["pretrained"] == "none" else "")


def build_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """[{label, cells: {benchmark: (miou, path, partial)}}] from results files, rows in first-seen order."""
    rows: dict[str, dict[str, Any]] = {}
    for path in map(Path, paths):
        record = _load(path)
        protocol = record["protocol"]
        label = row_label(protocol)
        identity = (protocol["backbone"], protocol["pretrained"])
        row = rows.setdefault(label, {"label": label, "identity": identity, "cells": {}})
        if row["identity"] != identity:
            raise ZeroShotTableError(f"{path}: row {label!r} mixes weights {row['identity']} and {identity}")
        bench = protocol["benchmark"]
        if bench in row["cells"]:
            raise ZeroShotTableError(f"two results for {label} on {bench}: {row['cells'][bench][1]} and {path}")
        row["cells"][bench] = (float(record["metrics"]["miou"]), path, bool(protocol.get("limit")))
    return list(rows.values())


def load_published(path: str | Path) -> list[dict[str, Any]]:
    """Rows of published numbers from a YAML file (fewshot/zeroshot/benchmarks/published.yaml): methods with name,
    source and miou per benchmark; an unknown benchmark or a number outside [0, 100] is an error naming the file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ZeroShotTableError(f"cannot read published numbers {path}: {err}") from err
    rows = []
    for entry in (data or {}).get("methods", []):
        where = f"{path}: {entry.get('name', '?')}"
        miou = entry.get("miou") or {}
        unknown = sorted(set(miou) - set(TABLE_ORDER))
        if unknown or not all(isinstance(v, int | float) and 0 <= v <= 100 for v in miou.values()):
            raise ZeroShotTableError(f"{where}: benchmarks {unknown} unknown (use {list(TABLE_ORDER)}) or a value "
                                     "outside [0, 100]")  # fmt: skip
        cells = {b: (float(v), path, False) for b, v in miou.items()}
        rows.append({"label": f"{entry['name']} [published]", "cells": cells, "source": entry.get("source", "")})
    if not rows:
        raise ZeroShotTableError(f"{path} holds no methods; expected 'methods: [{{name, source, miou}}]'")
    return rows


def _cell(value: float | None, partial: bool = False) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}{MARK if partial else ''}"


def render(rows: Sequence[dict[str, Any]], fmt: str = "markdown") -> str:
    """The table as markdown or csv."""
    titles = [BENCHMARKS[b].title for b in TABLE_ORDER] + ["Average"]
    lines, notes = [], []
    for row in rows:
        values = [row["cells"].get(b) for b in TABLE_ORDER]
        complete = all(v is not None for v in values)
        average = sum(v[0] for v in values) / len(values) if complete else None
        partial = [v for v in values if v is not None and v[2]]
        notes += [f"{MARK} {row['label']}: {v[1]} ran on part of the benchmark (--limit)" for v in partial]
        cells = [_cell(v[0], v[2]) if v else "-" for v in values] + [_cell(average, bool(partial))]
        lines.append([row["label"], *cells])
        if row.get("source"):
            notes.append(f"{row['label']}: {row['source']}")
    if fmt == "csv":
        out = [",".join(["method", *titles])]
        out += [",".join([f'"{line[0]}"', *(c if c != "-" else "" for c in line[1:])]) for line in lines]
        return "\n".join(out) + "\n"
    out = ["| Method | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(titles)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out + ([""] + notes if notes else [])) + "\n"


def format_per_class(results: dict[str, Any]) -> str:
    """The per-class IoU table of one results record (None: the class has an empty union)."""
    metrics = results["metrics"]
    names = [key[4:] for key in metrics if key.startswith("iou/")]
    width = max(len(n) for n in names)
    lines = [f"{'class':<{width}}  IoU"]
    for name in names:
        value = metrics[f"iou/{name}"]
        lines.append(f"{name:<{width}}  {'-' if value is None else f'{value:5.2f}'}")
    lines.append(f"{'mIoU':<{width}}  {metrics['miou']:5.2f}")
    return "\n".join(lines)
