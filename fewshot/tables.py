"""Benchmark tables from results.json files: methods as rows; per shot count, the folds of a dataset (or the targets
of a benchmark), their mean and FB-IoU. Files are read and checked in fewshot/results.py (re-exported here:
find_results, load_result, load_published, TableError) and rendered in fewshot/table_formats.py.

Cells. One table per dataset (PASCAL-5i, COCO-20i, ...), with one column per fold: `protocol.num_folds` of the
results (the dataset's source records it), else the published file's `num_folds` for the dataset. The datasets of a
benchmark share one table instead, one column per dataset (BENCHMARKS: the cross-domain targets of PATNet and DMTNet,
each a one-fold dataset). A row holds one label; a cell is (shots, dataset, fold); two files for one cell are an
error. Mean is the mean of the columns' mIoU and FB-IoU the mean of their FB-IoU; both are "-" unless every column
is there. A one-fold dataset's table shows its single number (no separate mean). Numbers are percent, one decimal.

Caveats. A result whose number is not a normal benchmark cell (fewshot.results: Caveats) is tabled with a mark (MARK,
"*" in csv's caveats column), and so are the mean and FB-IoU it enters; a note under the table names the file and why.

Protocol rule. Within one table every protocol field has a single value, with these exceptions:
  - FREE fields (fewshot.provenance.FREE): the cell's position (dataset, fold, shots), the code revision (git), the
    evaluation autocast, and the model's identity (method, model, backbone, head, shot_fusion, checkpoint, the
    checkpoint's training dataset and fold), which differs between rows by design;
  - pretrained is compared only as "none" versus real weights (the weights tag is model identity);
  - seeds is compared as a set of values: [0, 1] and [1, 0] agree, [0] and [321] do not;
  - fields that do not apply are skipped: coco_split and coco_crowd outside COCO, min_pixels with lists=hsnet;
  - a field newer than a results file takes its implied value there (IMPLIED: support_draw "distinct", sampler
    "native"; published rows are compared on what they record only);
  - in a benchmark table, PER_DATASET fields (episodes, query_order, num_folds, a dataset's own settings) need to
    agree only among the results of one dataset.
Every other field must match, including any this module does not know: split, lists, episodes, ways, min_pixels,
coco_split, novel_in_train, resize, image_size, eval_resolution, pretrained, support_draw... A difference is refused
with an error naming each differing field, its values and the files holding them, unless `allow_mixed`; the row
labels then show each row's values of the differing fields. UNMIXABLE fields are refused even then: episodes of two
samplers (native, hsnet, pfenet) never share a column. Within one row, backbone, head, model and pretrained must also
agree (one label, one model), always.

Published rows (configs/published.yaml) are references produced under their authors' protocols: they are never
refused. When the table has measured rows, the published row's recorded protocol fields that differ from the measured
rows' common value (or that have none, being mixed) are shown after the label, e.g. "PANet (VGG16) [published;
coco_split=consecutive]"; a published number counts as pretrained. Sources and notes follow the table.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .provenance import FREE
from .results import (  # noqa: F401  (the reading side, re-exported for tools/make_table.py)
    NOT_APPLICABLE,
    PUBLISHED_PROTOCOL,
    REQUIRED_PROTOCOL,
    Published,
    Result,
    TableError,
    find_results,
    load_published,
    load_result,
)

log = logging.getLogger(__name__)

DATASET_NAMES = {
    "pascal": "PASCAL-5i", "coco": "COCO-20i", "deepglobe": "Deepglobe", "isic": "ISIC2018",
    "chest_xray": "Chest X-ray", "fss1000": "FSS-1000",
}  # fmt: skip
ROW_IDENTITY = ("backbone", "head", "model", "pretrained")
MARK = "†"  # a number with a caveat (fewshot.results: Caveats)
IMPLIED = {"support_draw": lambda p: "distinct", "sampler": lambda p: "native"}  # newer than a results file: its value
UNMIXABLE = ("sampler",)  # numbers on other episodes differ by sampling alone (+-1-3 mIoU): never one column
PER_DATASET = frozenset({"episodes", "query_order", "num_folds", "fss1000_classes", "synthetic", "folder_folds"})
CDFSS_TARGETS = ("deepglobe", "isic", "chest_xray", "fss1000")  # PATNet's Table and DMTNet's, in their column order


@dataclass(frozen=True)
class Benchmark:
    """Datasets reported side by side in one table, one column each (each with one fold)."""

    title: str
    datasets: tuple[str, ...]


BENCHMARKS = {"cdfss": Benchmark("Cross-domain FSS (PATNet's benchmark: train on PASCAL VOC)", CDFSS_TARGETS)}
BENCHMARK_OF = {dataset: name for name, b in BENCHMARKS.items() for dataset in b.datasets}


@dataclass(frozen=True)
class Column:
    """One column of numbers in a table: a fold of a dataset."""

    dataset: str
    fold: int
    label: str  # "fold 0", or the dataset's name in a benchmark table


@dataclass
class Group:
    """The numbers of one row for one shot count, one per column; None prints as "-"."""

    cells: list[float | None]
    cell_std: list[float | None]
    marked: list[bool] = field(default_factory=list)  # columns with a caveat (the mean and FB-IoU are marked too)
    mean: float | None = None
    mean_std: float | None = None
    fbiou: float | None = None


@dataclass
class Row:
    label: str  # as printed, with its marks: "(random init)", "[published; ...]", mixed-protocol values
    name: str  # the method's own label
    published: bool = False
    groups: dict[int, Group] = field(default_factory=dict)  # shots -> numbers
    source: str = ""
    notes: str = ""


@dataclass
class Table:
    key: str  # the dataset, or the benchmark's name
    title: str
    columns: list[Column]
    protocol: dict[str, Any]  # the compared fields on which all measured cells agree
    mixed: list[str]  # compared fields on which they differ (only with allow_mixed)
    shots: list[int]
    rows: list[Row]
    per_column: dict[str, list[str]] = field(default_factory=dict)  # benchmark: PER_DATASET field -> value per column
    fbiou: bool = True  # an FB-IoU column (the benchmark layout, as published, has none)
    caveats: list[str] = field(default_factory=list)  # one line per marked cell: row, cell, file and why

    @property
    def single(self) -> bool:
        """One column: its number is the row's number, no separate mean column."""
        return len(self.columns) == 1


# --------------------------------------------------------------------------------------------------------------------
# Building tables: protocol checks, rows, means.


def _compared(protocol: dict[str, Any], drop: frozenset[str] = frozenset(), implied: bool = True) -> dict[str, Any]:
    """The fields of `protocol` that must agree within a table, normalised for comparison; `implied` fills in the
    IMPLIED fields a results file predates (a published entry says only what it records)."""
    if implied:
        protocol = {**{k: value(protocol) for k, value in IMPLIED.items()}, **protocol}
    out = {}
    for key, value in protocol.items():
        if key in FREE or key in drop or (key in NOT_APPLICABLE and NOT_APPLICABLE[key](protocol)):
            continue
        if key == "pretrained":
            value = "none" if value == "none" else "weights"
        elif key == "seeds" and isinstance(value, list) and all(isinstance(v, int) for v in value):
            value = sorted(set(value))
        out[key] = value
    return out


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _show(value: Any) -> str:
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else str(value)


def _protocol_groups(
    results: Sequence[Result], drop: frozenset[str] = frozenset()
) -> dict[str, dict[str, list[Result]]]:
    """field -> canonical value -> results holding it; a field a result lacks is "<absent>" unless not applicable."""
    compared = [_compared(r.protocol, drop) for r in results]
    keys = sorted({k for c in compared for k in c})
    groups: dict[str, dict[str, list[Result]]] = {k: {} for k in keys}
    for result, values in zip(results, compared, strict=True):
        for key in keys:
            if key in values:
                groups[key].setdefault(_canon(values[key]), []).append(result)
            elif not (key in NOT_APPLICABLE and NOT_APPLICABLE[key](result.protocol)):
                groups[key].setdefault('"<absent>"', []).append(result)
    return groups


def _mismatch_lines(title: str, groups: dict[str, dict[str, list[Result]]], differing: list[str]) -> list[str]:
    lines = [f"results of different protocols in one {title} table; differing fields: {', '.join(differing)}"]
    for key in differing:
        parts = []
        for canon, holders in groups[key].items():
            more = f" and {len(holders) - 1} more" if len(holders) > 1 else ""
            parts.append(f"{_show(json.loads(canon))} ({holders[0].path}{more})")
        lines.append(f"  {key}: " + "; ".join(parts))
    return lines


def _check_protocols(
    title: str, cells: Sequence[Result], datasets: Sequence[str] | None, allow_mixed: bool
) -> tuple[dict[str, Any], list[str], dict[str, dict[str, Any]]]:
    """(common fields, differing fields, dataset -> its common PER_DATASET fields) of a table's measured cells.

    `datasets` is the benchmark's datasets (PER_DATASET fields compared within each), None for a dataset table.
    """
    groups = _protocol_groups(cells, PER_DATASET if datasets else frozenset())
    differing = [k for k, values in groups.items() if len(values) > 1]
    lines = _mismatch_lines(title, groups, differing) if differing else []
    per_dataset: dict[str, dict[str, Any]] = {}
    for dataset in datasets or ():
        own = {
            k: v for k, v in _protocol_groups([c for c in cells if c.dataset == dataset]).items() if k in PER_DATASET
        }
        split = [k for k, values in own.items() if len(values) > 1]
        lines += _mismatch_lines(f"{title} ({DATASET_NAMES.get(dataset, dataset)})", own, split) if split else []
        differing += [k for k in split if k not in differing]
        per_dataset[dataset] = {k: json.loads(next(iter(v))) for k, v in own.items() if len(v) == 1}
    unmixable = [k for k in differing if k in UNMIXABLE]
    if unmixable:
        lines.append(
            f"{', '.join(unmixable)} cannot be mixed, even with --allow-mixed-protocols: the episodes themselves "
            "differ; table the results of each sampler separately."
        )
        raise TableError("\n".join(lines))
    if lines and not allow_mixed:
        lines.append("Pass only results of one protocol, or --allow-mixed-protocols to put them in one table anyway.")
        raise TableError("\n".join(lines))
    if differing:
        log.warning("%s table mixes protocols (%s): row labels show each row's values", title, ", ".join(differing))
    return {k: json.loads(next(iter(v))) for k, v in groups.items() if len(v) == 1}, differing, per_dataset


def _columns(key: str, bench: Benchmark | None, cells: Sequence[Result], refs: Sequence[Published]) -> list[Column]:
    if bench is not None:
        wrong = [c for c in cells if c.protocol["num_folds"] != 1]
        if wrong:
            raise TableError(
                f"{wrong[0].path}: {wrong[0].dataset} has {wrong[0].protocol['num_folds']} folds, but the "
                f"{bench.title} table takes one number per dataset (one-fold datasets)"
            )
        return [Column(d, 0, DATASET_NAMES.get(d, d)) for d in bench.datasets]
    counts = {c.protocol["num_folds"] for c in cells} or {len(p.folds) for p in refs}
    return [Column(key, f, f"fold {f}") for f in range(max(counts, default=0))]


def _measured_rows(results: Sequence[Result], mixed: list[str], columns: list[Column]) -> list[Row]:
    by_label: dict[str, list[Result]] = {}
    for result in results:
        by_label.setdefault(result.label, []).append(result)
    rows = []
    for name, cells in sorted(by_label.items()):
        label = name
        for key in ROW_IDENTITY:
            values = {_canon(c.protocol.get(key)): c for c in cells}
            if len(values) > 1:
                shown = "; ".join(f"{c.protocol.get(key)!r} ({c.path})" for c in values.values())
                raise TableError(f"row {label!r} mixes models: {key} differs: {shown}; give the runs distinct names")
        seen: dict[tuple[int, str, int], Result] = {}
        for c in cells:
            cell = (c.shots, c.dataset, c.fold)
            if cell in seen:
                raise TableError(
                    f"two results for {label!r}, {c.shots}-shot {c.dataset} fold {c.fold}: {seen[cell].path} and "
                    f"{c.path}; pass only the one you mean"
                )
            seen[cell] = c
        if mixed:
            values = {k: sorted({_show(_compared(c.protocol).get(k, "<absent>")) for c in cells}) for k in mixed}
            label += " [" + ", ".join(f"{k}={'|'.join(v)}" for k, v in values.items()) + "]"
        shots = sorted({c.shots for c in cells})
        rows.append(Row(label=label, name=name, groups={k: _group(seen, k, columns) for k in shots}))
    return rows


def _group(cells: dict[tuple[int, str, int], Result], shots: int, columns: list[Column]) -> Group:
    present = [cells.get((shots, col.dataset, col.fold)) for col in columns]
    group = Group(
        cells=[None if c is None else c.miou for c in present],
        cell_std=[None if c is None else c.miou_std for c in present],
        marked=[c is not None and bool(c.caveats) for c in present],
    )
    if not present or any(c is None for c in present):
        return group
    group.mean = statistics.fmean(c.miou for c in present)
    group.fbiou = statistics.fmean(c.fbiou for c in present)
    seeds = set(present[0].seed_miou)
    if len(seeds) > 1 and all(set(c.seed_miou) == seeds for c in present):
        group.mean_std = statistics.pstdev(statistics.fmean(c.seed_miou[s] for c in present) for s in seeds)
    return group


def _published_rows(
    published: Sequence[Published],
    columns: list[Column],
    common: dict[str, Any],
    per_dataset: dict[str, dict[str, Any]],
    measured: bool,
) -> list[Row]:
    """Rows of published numbers, labelled with the recorded protocol fields that differ from the measured rows'."""
    rows: dict[str, Row] = {}
    notes: dict[str, dict[str, str]] = {}
    per_column: dict[str, dict[str, list[str]]] = {}  # benchmark: label -> PER_DATASET field -> value per column
    datasets = [col.dataset for col in columns]
    bench = len(set(datasets)) > 1
    for p in published:
        row = rows.setdefault(p.label, Row(p.label, p.label, published=True, source=p.source, notes=p.notes))
        empty = Group(cells=[None] * len(columns), cell_std=[None] * len(columns))
        group = row.groups.setdefault(p.shots, empty)
        if bench:  # one number per dataset; the mean over the benchmark's datasets when all are known
            group.cells[datasets.index(p.dataset)] = p.folds[0] if p.folds else p.mean
            known = [v for v in group.cells if v is not None]
            group.mean = statistics.fmean(known) if len(known) == len(columns) else None
        else:
            group.cells = list(p.folds) if len(p.folds) == len(columns) else group.cells
            group.mean, group.fbiou = p.mean, p.fbiou
        recorded = {**p.protocol, "dataset": p.dataset, "pretrained": p.protocol.get("pretrained", "weights")}
        proto = _compared(recorded, implied=False)
        diffs, own = notes.setdefault(p.label, {}), per_column.setdefault(p.label, {})
        for key, value in proto.items():
            per_dataset_key = bench and key in PER_DATASET  # compared with its own dataset's results, per column
            reference = per_dataset.get(p.dataset, {}) if per_dataset_key else common
            if not measured or (key in reference and _canon(reference[key]) == _canon(value)):
                continue
            if per_dataset_key:
                own.setdefault(key, ["-"] * len(columns))[datasets.index(p.dataset)] = _show(value)
            else:
                diffs[key] = _show(value)
    for label, row in rows.items():
        shown = {**notes[label], **{k: "|".join(v) for k, v in per_column[label].items()}}
        row.label = f"{label} [published{''.join(f'; {k}={v}' for k, v in shown.items())}]"
    return list(rows.values())


def _cell_name(result: Result, bench: Benchmark | None) -> str:
    shots = "zero-shot" if result.shots == 0 else f"{result.shots}-shot"
    where = DATASET_NAMES.get(result.dataset, result.dataset) if bench else f"fold {result.fold}"
    return f"{shots} {where}"


def _order(key: str) -> tuple[int, str]:
    order = [*DATASET_NAMES, *BENCHMARKS]
    rank = order.index(key) if key in order else len(order)
    return (min(rank, 2) if key in BENCHMARKS else rank, key)


def build_tables(
    results: Sequence[Result], published: Sequence[Published] = (), allow_mixed: bool = False
) -> list[Table]:
    """One table per dataset or benchmark of `results` (or of `published` when there are no results), checked as
    described above."""
    keys = {BENCHMARK_OF.get(r.dataset, r.dataset) for r in results} or {
        BENCHMARK_OF.get(p.dataset, p.dataset) for p in published
    }
    if results and all(r.miou <= 1.0 for r in results):
        log.warning("every mIoU is <= 1: results.json stores percent; were these written as fractions?")
    tables = []
    for key in sorted(keys, key=_order):
        bench = BENCHMARKS.get(key)
        datasets = bench.datasets if bench else (key,)
        title = bench.title if bench else DATASET_NAMES.get(key, key)
        cells = [r for r in results if r.dataset in datasets]
        refs = [p for p in published if p.dataset in datasets]
        common, differing, per_dataset = _check_protocols(title, cells, bench and bench.datasets, allow_mixed)
        columns = _columns(key, bench, cells, refs)
        rows = _published_rows(refs, columns, common, per_dataset, measured=bool(cells))
        rows += _measured_rows(cells, differing, columns)
        per_column = {}  # a benchmark's PER_DATASET fields: one value per column where they differ, else common
        for k in sorted({k for own in per_dataset.values() for k in own}):
            values = [_show(per_dataset[c.dataset].get(k, "-")) for c in columns]
            if len(set(values)) > 1:
                per_column[k] = values
            else:
                common[k] = per_dataset[columns[0].dataset].get(k)
        shots = sorted({k for row in rows for k in row.groups})
        labels = {r.name: r.label for r in rows if not r.published}
        caveats = [
            f"{labels[r.label]}, {_cell_name(r, bench)} ({r.path}): {why}"
            for r in sorted(cells, key=lambda r: (r.label, r.shots, r.dataset, r.fold))
            for why in r.caveats
        ]
        tables.append(Table(key, title, columns, common, differing, shots, rows, per_column, bench is None, caveats))
    return tables
