"""The tables of fewshot/tables.py as Markdown, LaTeX or CSV.

Markdown and LaTeX (booktabs; sources as comments) print "-" for a missing number and MARK after a number with a
caveat, with the reasons under the table; CSV has one line per row with a `dataset` column, one column per number
(`1shot_fold0` ... `5shot_fbiou`, or `1shot_deepglobe` ... in a benchmark table, `1shot_miou` for a one-fold dataset),
empty cells for missing numbers and a `caveats` column.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from .tables import MARK, Group, Row, Table, TableError


def _num(value: float | None, std: float | None = None, missing: str = "-", pm: str = " ± ", mark: str = "") -> str:
    if value is None:
        return missing
    return f"{value:.1f}" + (f"{pm}{std:.1f}" if std is not None else "") + mark


def _shots_name(shots: int) -> str:
    return "zero-shot" if shots == 0 else f"{shots}-shot"


def _names(table: Table) -> list[str]:
    """Column headers of one shot count: the columns and their mean (one column alone: mIoU), then FB-IoU."""
    names = ["mIoU"] if table.single else [c.label for c in table.columns] + ["mean"]
    return names + (["FB-IoU"] if table.fbiou else [])


def _slugs(table: Table) -> list[str]:
    """The CSV names of _names: fold0 ... mean fbiou, deepglobe ... mean, or miou fbiou."""
    columns = [f"fold{c.fold}" if c.label.startswith("fold") else c.dataset for c in table.columns]
    names = ["miou"] if table.single else columns + ["mean"]
    return names + (["fbiou"] if table.fbiou else [])


def _values(table: Table, group: Group) -> list[tuple[float | None, float | None, bool]]:
    """(value, std, marked) per name of _names: a mean and FB-IoU are marked when a column they average is."""
    marked = group.marked or [False] * len(group.cells)
    if table.single:
        cell = group.cells[0] if group.cells else group.mean
        values = [(cell, group.cell_std[0] if group.cell_std else None, any(marked))]
    else:
        values = [*zip(group.cells, group.cell_std, marked, strict=True), (group.mean, group.mean_std, any(marked))]
    return values + ([(group.fbiou, None, any(marked))] if table.fbiou else [])


def _empty(table: Table) -> Group:
    return Group(cells=[None] * len(table.columns), cell_std=[None] * len(table.columns))


def _cells(row: Row, table: Table, std: bool, missing: str = "-", pm: str = " ± ", mark: str = MARK) -> list[str]:
    out = []
    for k in table.shots:
        for value, spread, marked in _values(table, row.groups.get(k, _empty(table))):
            out.append(_num(value, spread if std else None, missing, pm, mark if marked else ""))
    return out


def _caption(table: Table) -> str:
    n = len(table.columns)
    if table.single:
        what = "mIoU (%)"
    elif table.fbiou:
        what = f"mIoU (%), mean of {n} folds"
    else:
        what = f"mIoU (%), mean of {n} datasets"
    return f"{table.title}: {what}" + (", FB-IoU (%)" if table.fbiou else "")


def _protocol_line(table: Table) -> str:
    line = ", ".join(f"{k}={_show(v)}" for k, v in table.protocol.items())
    if table.per_column:
        line += "; per column: " + ", ".join(f"{k}={'|'.join(v)}" for k, v in table.per_column.items())
    return line + (f"; mixed: {', '.join(table.mixed)}" if table.mixed else "")


def _show(value: object) -> str:
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else str(value)


def to_markdown(tables: Sequence[Table], std: bool = False) -> str:
    parts = []
    for t in tables:
        head = ["Method"] + [f"{_shots_name(k)} {name}" for k in t.shots for name in _names(t)]
        lines = [f"### {_caption(t)}", ""]
        lines += [f"Protocol: {_protocol_line(t)}", ""] if t.protocol or t.mixed or t.per_column else []
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
        for row in t.rows:
            lines.append("| " + " | ".join([row.label.replace("|", "\\|"), *_cells(row, t, std)]) + " |")
        marked = [f"- {line}" for line in t.caveats]
        if marked:
            lines += ["", f"{MARK} Not a normal benchmark number (and so are the means it enters):", *marked]
        sources = [
            f"- {row.name}: {row.source}" + (f" ({row.notes})" if row.notes else "") for row in t.rows if row.published
        ]
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
        names = [f"Fold-{n[5:]}" if n.startswith("fold ") else n.replace("mean", "Mean") for n in _names(t)]
        width = len(names)
        lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(_caption(t))}.}}"]
        lines += [f"% protocol: {_protocol_line(t)}"]
        lines += [rf"\begin{{tabular}}{{l{('c' * width) * len(t.shots)}}}", r"\toprule"]
        lines.append(" & " + " & ".join(rf"\multicolumn{{{width}}}{{c}}{{{_shots_name(k)}}}" for k in t.shots) + r" \\")
        lines.append("".join(rf"\cmidrule(lr){{{2 + i * width}-{1 + (i + 1) * width}}}" for i in range(len(t.shots))))
        lines.append("Method & " + " & ".join(_tex(n) for n in names * len(t.shots)) + r" \\")
        lines.append(r"\midrule")
        for i, row in enumerate(t.rows):
            if i and t.rows[i - 1].published and not row.published:
                lines.append(r"\midrule")
            cells = _cells(row, t, std, pm=r"$\pm$", mark=r"$^\dagger$")
            lines.append(" & ".join([_tex(row.label), *cells]) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        lines += [f"% dagger: {line}" for line in t.caveats]
        lines += [f"% {row.name}: {row.source}" for row in t.rows if row.published]
        lines.append(r"\end{table}")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def to_csv(tables: Sequence[Table], std: bool = False) -> str:
    shots = sorted({k for t in tables for k in t.shots})
    names = list(dict.fromkeys(n for t in tables for n in _slugs(t)))  # every table's columns, first-seen order
    header = ["dataset", "method", "published"] + [f"{k}shot_{n}" for k in shots for n in names]
    if std:
        header += [f"{k}shot_{n}_std" for k in shots for n in names if n != "fbiou"]
    header += ["protocol", "source", "caveats"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for t in tables:
        for row in t.rows:
            by_name = {
                (k, n): v
                for k in shots
                for n, v in zip(_slugs(t), _values(t, row.groups.get(k, _empty(t))), strict=True)
            }
            none = (None, None, False)
            values = [_num(by_name.get((k, n), none)[0], missing="") for k in shots for n in names]
            if std:
                spreads = [by_name.get((k, n), none)[1] for k in shots for n in names if n != "fbiou"]
                values += [_num(v, missing="") for v in spreads]
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
