"""Benchmark tables from results.json files: methods as rows; fold 0..3, mean and FB-IoU for each shot count.

Reading. A path given explicitly is read whatever its name; a folder is searched recursively for `results.json`
and `fold<f>_<k>shot.json` (the names tools/test_fold.py writes). A file must hold `miou`, `fbiou` (percent) and
`protocol` with the keys of REQUIRED_PROTOCOL; a missing key is an error naming the file and every missing key. The
row label is `method`, else `protocol.model`, with " (random init)" appended when `protocol.pretrained` is "none".

Cells. One table per dataset (PASCAL-5i, COCO-20i, ...). A row holds one label; a cell is (shots, fold); two files for
one cell are an error. Mean is the mean of the four folds' mIoU and FB-IoU the mean of the four folds' FB-IoU; both
are "-" unless all four folds are there. Numbers are printed in percent with one decimal.

Caveats. A result whose number is not a normal benchmark cell is tabled with a mark (MARK, "*" in csv's caveats
column), and so are the mean and FB-IoU it enters; a note under the table names the file and why: `absent_classes`
(classes of the fold without a test episode, left out of its mIoU: fewshot.metrics) and
`protocol.trained_classes_tested` (a checkpoint tested on classes it was trained on: fewshot.preflight).

Protocol rule. Within one table every protocol field has a single value, except:
  - FREE fields: the cell's position (dataset, fold, shots), the code revision (git), and the model's identity
    (method, model, backbone, head, shot_fusion, checkpoint), which differs between rows by design;
  - pretrained is compared only as "none" versus real weights (the weights tag is model identity);
  - seeds is compared as a set of values: [0, 1] and [1, 0] agree, [0] and [321] do not;
  - fields that do not apply are skipped: coco_split and coco_crowd outside COCO, min_pixels with lists=hsnet.
Every other field must match, including any this module does not know: split, lists, episodes, ways, min_pixels,
coco_split, novel_in_train, resize, image_size, eval_resolution, pretrained... A difference is refused with an error
naming each differing field, its values and the files holding them, unless `allow_mixed`; the row labels then show
each row's values of the differing fields. Within one row, backbone, head, model and pretrained must also agree
(one label, one model), always.

Published rows (configs/published.yaml) are references produced under their authors' protocols: they are never
refused. When the table has measured rows, the published row's recorded protocol fields that differ from the measured
rows' common value (or that have none, being mixed) are shown after the label, e.g. "PANet (VGG16) [published;
coco_split=consecutive]"; a published number counts as pretrained. Sources and notes follow the table.

Formats: markdown and latex (booktabs; sources as comments) print "-" for a missing number; csv has one line per row
with a `dataset` column, one column per number (`1shot_fold0` ... `5shot_fbiou`) and empty cells for missing numbers.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .provenance import DATASET_FIELDS, FREE, REQUIRED

log = logging.getLogger(__name__)

FOLDS = (0, 1, 2, 3)
DATASET_NAMES = {"pascal": "PASCAL-5i", "coco": "COCO-20i"}
RESULT_NAME = re.compile(r"results\.json|fold\d+_\d+shot\.json")
REQUIRED_PROTOCOL = REQUIRED + tuple(DATASET_FIELDS["coco"])  # the COCO ones only where dataset is coco
ROW_IDENTITY = ("backbone", "head", "model", "pretrained")
MARK = "†"  # a number with a caveat (see Caveats above)
NOT_APPLICABLE = {
    **{key: (lambda p, d=dataset: p.get("dataset") != d) for dataset, keys in DATASET_FIELDS.items() for key in keys},
    "min_pixels": lambda p: p.get("lists") == "hsnet",
}
# Protocol keys a published entry may record: the compared fields of REQUIRED_PROTOCOL.
PUBLISHED_PROTOCOL = tuple(k for k in REQUIRED_PROTOCOL if k not in FREE)


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
    folds: tuple[float | None, ...]
    fbiou: float | None
    protocol: dict[str, Any]
    source: str
    notes: str

    @property
    def label(self) -> str:
        return f"{self.name} ({self.backbone})" if self.backbone else self.name


@dataclass
class Group:
    """The numbers of one row for one shot count; None prints as "-"."""

    folds: list[float | None] = field(default_factory=lambda: [None] * len(FOLDS))
    fold_std: list[float | None] = field(default_factory=lambda: [None] * len(FOLDS))
    mean: float | None = None
    mean_std: float | None = None
    fbiou: float | None = None
    marked: list[bool] = field(default_factory=lambda: [False] * len(FOLDS))  # folds with a caveat; mean and FB-IoU too


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
    dataset: str
    protocol: dict[str, Any]  # the compared fields on which all measured cells agree
    mixed: list[str]  # compared fields on which they differ (only with allow_mixed)
    shots: list[int]
    rows: list[Row]
    caveats: list[str] = field(default_factory=list)  # one line per marked cell: row, cell, file and why

    @property
    def title(self) -> str:
        return DATASET_NAMES.get(self.dataset, self.dataset)


# --------------------------------------------------------------------------------------------------------------------
# Reading results and published numbers.


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
    for key, valid in (("fold", lambda v: v in FOLDS), ("shots", lambda v: v >= 0)):
        if isinstance(proto[key], bool) or not isinstance(proto[key], int) or not valid(proto[key]):
            raise TableError(f"{path}: protocol.{key}={proto[key]!r} is not valid (fold: 0..3, shots: >= 0)")
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
    out = []
    for i, method in enumerate(methods):
        where = f"{path}: methods[{i}]"
        keys = ("name", "backbone", "source", "notes", "protocol", "results")
        method = _check_keys(method, keys, ("name", "source", "results"), where)
        for j, res in enumerate(method["results"]):
            rkeys = ("dataset", "shots", "miou", "folds", "fbiou", "protocol", "backbone")
            res = _check_keys(res, rkeys, ("dataset", "shots"), f"{where} ({method['name']}).results[{j}]")
            out.append(_published(method, res, f"{where}.results[{j}]"))
    if only:
        wanted = {name.lower() for name in only}
        valid = {p.name.lower() for p in out} | {p.label.lower() for p in out}
        unknown = [name for name in only if name.lower() not in valid]
        if unknown:
            names = sorted({p.name for p in out} | {p.label for p in out})
            raise TableError(f"unknown published method(s) {unknown} in {path}; choose from {names}")
        out = [p for p in out if p.name.lower() in wanted or p.label.lower() in wanted]
    return out


def _published(method: dict[str, Any], res: dict[str, Any], where: str) -> Published:
    if isinstance(res["shots"], bool) or not isinstance(res["shots"], int) or res["shots"] < 0:
        raise TableError(f"{where}: shots={res['shots']!r} must be an integer >= 0 (0 for zero-shot)")
    protocol = {**(method.get("protocol") or {}), **(res.get("protocol") or {})}
    unknown = sorted(set(protocol) - set(PUBLISHED_PROTOCOL))
    if unknown:
        raise TableError(f"{where}: unknown protocol keys {unknown}; valid keys: {', '.join(PUBLISHED_PROTOCOL)}")
    folds = res.get("folds") or [None] * len(FOLDS)
    if not isinstance(folds, list) or len(folds) != len(FOLDS):
        raise TableError(f"{where}: folds must list the mIoU of folds 0..3 (null for an unknown fold), got {folds!r}")
    folds = [None if v is None else _percent(v, Path(where), "folds") for v in folds]
    mean = None if res.get("miou") is None else _percent(res["miou"], Path(where), "miou")
    if None not in folds:
        fold_mean = statistics.fmean(folds)
        if mean is not None and abs(mean - fold_mean) > 0.1:
            raise TableError(f"{where}: miou={mean} is not the mean of folds {folds} ({fold_mean:.2f}); fix one")
        mean = fold_mean if mean is None else mean
    if mean is None:
        raise TableError(f"{where}: give miou (the mean over folds) or all four folds")
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


# --------------------------------------------------------------------------------------------------------------------
# Building tables: protocol checks, rows, means.


def _compared(protocol: dict[str, Any]) -> dict[str, Any]:
    """The fields of `protocol` that must agree within a table, normalised for comparison."""
    out = {}
    for key, value in protocol.items():
        if key in FREE or (key in NOT_APPLICABLE and NOT_APPLICABLE[key](protocol)):
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


def _protocol_groups(results: Sequence[Result]) -> dict[str, dict[str, list[Result]]]:
    """field -> canonical value -> results holding it; a field a result lacks is "<absent>" unless not applicable."""
    compared = [_compared(r.protocol) for r in results]
    keys = sorted({k for c in compared for k in c})
    groups: dict[str, dict[str, list[Result]]] = {k: {} for k in keys}
    for result, values in zip(results, compared, strict=True):
        for key in keys:
            if key in values:
                groups[key].setdefault(_canon(values[key]), []).append(result)
            elif not (key in NOT_APPLICABLE and NOT_APPLICABLE[key](result.protocol)):
                groups[key].setdefault('"<absent>"', []).append(result)
    return groups


def _mismatch_message(title: str, groups: dict[str, dict[str, list[Result]]], differing: list[str]) -> str:
    lines = [f"results of different protocols in one {title} table; differing fields: {', '.join(differing)}"]
    for key in differing:
        parts = []
        for canon, holders in groups[key].items():
            more = f" and {len(holders) - 1} more" if len(holders) > 1 else ""
            parts.append(f"{_show(json.loads(canon))} ({holders[0].path}{more})")
        lines.append(f"  {key}: " + "; ".join(parts))
    lines.append("Pass only results of one protocol, or --allow-mixed-protocols to put them in one table anyway.")
    return "\n".join(lines)


def _measured_rows(results: Sequence[Result], mixed: list[str]) -> list[Row]:
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
        seen: dict[tuple[int, int], Result] = {}
        for c in cells:
            if (c.shots, c.fold) in seen:
                raise TableError(
                    f"two results for {label!r}, {c.shots}-shot fold {c.fold}: {seen[c.shots, c.fold].path} and "
                    f"{c.path}; pass only the one you mean"
                )
            seen[c.shots, c.fold] = c
        if mixed:
            values = {k: sorted({_show(_compared(c.protocol).get(k, "<absent>")) for c in cells}) for k in mixed}
            label += " [" + ", ".join(f"{k}={'|'.join(v)}" for k, v in values.items()) + "]"
        rows.append(Row(label=label, name=name, groups={k: _group(seen, k) for k in sorted({c.shots for c in cells})}))
    return rows


def _group(cells: dict[tuple[int, int], Result], shots: int) -> Group:
    group = Group()
    present = [cells.get((shots, f)) for f in FOLDS]
    for f, cell in enumerate(present):
        if cell is not None:
            group.folds[f], group.fold_std[f], group.marked[f] = cell.miou, cell.miou_std, bool(cell.caveats)
    if any(c is None for c in present):
        return group
    group.mean = statistics.fmean(c.miou for c in present)
    group.fbiou = statistics.fmean(c.fbiou for c in present)
    seeds = set(present[0].seed_miou)
    if len(seeds) > 1 and all(set(c.seed_miou) == seeds for c in present):
        group.mean_std = statistics.pstdev(statistics.fmean(c.seed_miou[s] for c in present) for s in seeds)
    return group


def _published_rows(published: Sequence[Published], common: dict[str, Any], measured: bool) -> list[Row]:
    """Rows of published numbers, labelled with the recorded protocol fields that differ from the measured rows'."""
    rows: dict[str, Row] = {}
    notes: dict[str, dict[str, str]] = {}
    for p in published:
        row = rows.setdefault(p.label, Row(p.label, p.label, published=True, source=p.source, notes=p.notes))
        row.groups[p.shots] = Group(folds=list(p.folds), mean=p.mean, fbiou=p.fbiou)
        proto = _compared({**p.protocol, "dataset": p.dataset, "pretrained": p.protocol.get("pretrained", "weights")})
        diffs = notes.setdefault(p.label, {})
        for key, value in proto.items():
            if measured and (key not in common or _canon(common[key]) != _canon(value)):
                diffs[key] = _show(value)
    for label, row in rows.items():
        extra = "".join(f"; {k}={v}" for k, v in notes[label].items())
        row.label = f"{label} [published{extra}]"
    return list(rows.values())


def build_tables(
    results: Sequence[Result], published: Sequence[Published] = (), allow_mixed: bool = False
) -> list[Table]:
    """One table per dataset of `results` (or of `published` when there are no results), checked as described above."""
    order = {name: i for i, name in enumerate(DATASET_NAMES)}
    datasets = {r.dataset for r in results} or {p.dataset for p in published}
    if results and all(r.miou <= 1.0 for r in results):
        log.warning("every mIoU is <= 1: results.json stores percent; were these written as fractions?")
    tables = []
    for dataset in sorted(datasets, key=lambda d: (order.get(d, len(order)), d)):
        cells = [r for r in results if r.dataset == dataset]
        groups = _protocol_groups(cells)
        differing = [k for k, values in groups.items() if len(values) > 1]
        title = DATASET_NAMES.get(dataset, dataset)
        if differing and not allow_mixed:
            raise TableError(_mismatch_message(title, groups, differing))
        if differing:
            log.warning("%s table mixes protocols (%s): row labels show each row's values", title, ", ".join(differing))
        common = {k: json.loads(next(iter(v))) for k, v in groups.items() if len(v) == 1}
        references = _published_rows([p for p in published if p.dataset == dataset], common, measured=bool(cells))
        rows = references + _measured_rows(cells, differing)
        shots = sorted({k for row in rows for k in row.groups})
        labels = {r.name: r.label for r in rows if not r.published}
        caveats = [
            f"{labels[r.label]}, {_shots_name(r.shots)} fold {r.fold} ({r.path}): {why}"
            for r in sorted(cells, key=lambda r: (r.label, r.shots, r.fold))
            for why in r.caveats
        ]
        tables.append(Table(dataset, common, differing, shots, rows, caveats))
    return tables


# --------------------------------------------------------------------------------------------------------------------
# Rendering.


def _num(value: float | None, std: float | None = None, missing: str = "-", pm: str = " ± ", mark: str = "") -> str:
    if value is None:
        return missing
    return f"{value:.1f}" + (f"{pm}{std:.1f}" if std is not None else "") + mark


def _shots_name(shots: int) -> str:
    return "zero-shot" if shots == 0 else f"{shots}-shot"


def _cells(
    row: Row, shots: Sequence[int], std: bool, missing: str = "-", pm: str = " ± ", mark: str = MARK
) -> list[str]:
    out = []
    for k in shots:
        g = row.groups.get(k, Group())
        marks = [mark if m else "" for m in g.marked]
        out += [_num(v, s if std else None, missing, pm, m) for v, s, m in zip(g.folds, g.fold_std, marks, strict=True)]
        m = mark if any(g.marked) else ""
        out += [_num(g.mean, g.mean_std if std else None, missing, pm, m), _num(g.fbiou, None, missing, mark=m)]
    return out


def _protocol_line(table: Table) -> str:
    line = ", ".join(f"{k}={_show(v)}" for k, v in table.protocol.items())
    return line + (f"; mixed: {', '.join(table.mixed)}" if table.mixed else "")


def to_markdown(tables: Sequence[Table], std: bool = False) -> str:
    parts = []
    for t in tables:
        head = ["Method"] + [
            f"{_shots_name(k)} {c}" for k in t.shots for c in (*map("fold {}".format, FOLDS), "mean", "FB-IoU")
        ]
        lines = [f"### {t.title}: mIoU (%), mean of 4 folds, FB-IoU (%)", ""]
        lines += [f"Protocol: {_protocol_line(t)}", ""] if t.protocol or t.mixed else []
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
        for row in t.rows:
            lines.append("| " + " | ".join([row.label.replace("|", "\\|"), *_cells(row, t.shots, std)]) + " |")
        sources = [
            f"- {row.name}: {row.source}" + (f" ({row.notes})" if row.notes else "") for row in t.rows if row.published
        ]
        marked = [f"- {line}" for line in t.caveats]
        lines += (
            ["", f"{MARK} Not a normal benchmark number (and so are the means it enters):", *marked] if marked else []
        )
        parts.append("\n".join(lines + (["", "Published rows:", *sources] if sources else [])) + "\n")
    return "\n".join(parts)


_LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
}


def _tex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def to_latex(tables: Sequence[Table], std: bool = False) -> str:
    parts = []
    for t in tables:
        width = len(FOLDS) + 2
        lines = [
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{_tex(t.title)}: mIoU (\%), mean of 4 folds, FB-IoU (\%).}}",
        ]
        lines += [f"% protocol: {_protocol_line(t)}"]
        lines += [rf"\begin{{tabular}}{{l{('c' * width) * len(t.shots)}}}", r"\toprule"]
        lines.append(" & " + " & ".join(rf"\multicolumn{{{width}}}{{c}}{{{_shots_name(k)}}}" for k in t.shots) + r" \\")
        lines.append("".join(rf"\cmidrule(lr){{{2 + i * width}-{1 + (i + 1) * width}}}" for i in range(len(t.shots))))
        names = [f"Fold-{f}" for f in FOLDS] + ["Mean", "FB-IoU"]
        lines.append("Method & " + " & ".join(names * len(t.shots)) + r" \\")
        lines.append(r"\midrule")
        for i, row in enumerate(t.rows):
            if i and t.rows[i - 1].published and not row.published:
                lines.append(r"\midrule")
            lines.append(
                " & ".join([_tex(row.label), *_cells(row, t.shots, std, pm=r"$\pm$", mark=r"$^\dagger$")]) + r" \\"
            )
        lines += [r"\bottomrule", r"\end{tabular}"]
        lines += [f"% {row.name}: {row.source}" for row in t.rows if row.published]
        lines += [f"% dagger: {line}" for line in t.caveats]
        lines.append(r"\end{table}")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def to_csv(tables: Sequence[Table], std: bool = False) -> str:
    shots = sorted({k for t in tables for k in t.shots})
    names = [f"fold{f}" for f in FOLDS] + ["mean", "fbiou"]
    header = ["dataset", "method", "published"] + [f"{k}shot_{n}" for k in shots for n in names]
    if std:
        header += [f"{k}shot_{n}_std" for k in shots for n in names[:-1]]
    header += ["protocol", "source", "caveats"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for t in tables:
        for row in t.rows:
            groups = [row.groups.get(k, Group()) for k in shots]
            values = [_num(v, missing="") for g in groups for v in (*g.folds, g.mean, g.fbiou)]
            if std:
                values += [_num(v, missing="") for g in groups for v in (*g.fold_std, g.mean_std)]
            protocol = row.notes if row.published else _protocol_line(t)
            caveats = "; ".join(c for c in t.caveats if c.startswith(f"{row.label}, "))
            writer.writerow(
                [t.title, row.label, "yes" if row.published else "no", *values, protocol, row.source, caveats]
            )
    return buf.getvalue()


FORMATS = {"markdown": to_markdown, "latex": to_latex, "csv": to_csv}


def render(tables: Sequence[Table], fmt: str = "markdown", std: bool = False) -> str:
    """The tables as text in `fmt` (markdown | latex | csv); `std` adds the spread over test seeds."""
    if fmt not in FORMATS:
        raise TableError(f"unknown table format {fmt!r}; choose from {sorted(FORMATS)}")
    return FORMATS[fmt](tables, std=std)
