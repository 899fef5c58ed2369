"""Print the standard few-shot table from results.json files, optionally beside published numbers.

    python tools/make_table.py runs/ [more results or folders ...] [--format markdown|latex|csv]
        [--published configs/published.yaml [--published-only HSNet DCAMA]] [--allow-mixed-protocols] [--std]
        [--out table.md]
    python tools/make_table.py --zero-shot runs/zs/ [--published fewshot/zeroshot/benchmarks/published.yaml]
        [--format markdown|csv] [--out table.md]

Rows are methods; for each shot count the columns are the dataset's folds (as many as its results' protocol records),
their mean and FB-IoU, in percent; a one-fold dataset shows its single number, and the cross-domain targets
(Deepglobe, ISIC2018, Chest X-ray, FSS-1000) share one table with a column each and their mean. Folders are searched
recursively for results.json and fold<f>_<k>shot.json. Results of different protocols are refused unless
--allow-mixed-protocols, and results of different samplers (data.sampler) always; which fields must agree is
documented in fewshot/tables.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

from fewshot import table_formats, tables
from fewshot.io import write_text

log = logging.getLogger("make_table")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", help="results.json files or folders searched for them")
    parser.add_argument("--format", default="markdown", choices=sorted(table_formats.FORMATS), help="output format")
    parser.add_argument("--published", metavar="FILE", help="YAML of published numbers, e.g. configs/published.yaml")
    parser.add_argument(
        "--published-only", nargs="+", metavar="NAME", help="keep only these published methods (HSNet, 'HSNet (RN101)')"
    )
    parser.add_argument("--allow-mixed-protocols", action="store_true", help="put different protocols in one table")
    parser.add_argument("--std", action="store_true", help="show the spread (std) over test seeds")
    parser.add_argument(
        "--zero-shot", action="store_true", help="the zero-shot benchmark table (tools/zero_shot_benchmark.py results)"
    )
    parser.add_argument("--out", help="write the table to this file (atomically) instead of printing it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    if args.published_only and not args.published:
        parser.error("--published-only needs --published FILE")
    if not args.results and not args.published:
        parser.error("give results files or folders, or --published FILE")
    if args.zero_shot:
        return zero_shot_table(args.results, args.format, args.out, args.published)
    only = [name.strip() for text in args.published_only or [] for name in text.split(",") if name.strip()]
    try:
        results = [tables.load_result(path) for path in tables.find_results(args.results)]
        published = tables.load_published(args.published, only or None) if args.published else []
        built = tables.build_tables(results, published, allow_mixed=args.allow_mixed_protocols)
        text = table_formats.render(built, args.format, std=args.std)
    except tables.TableError as err:
        log.error("%s", err)
        return 2
    if args.out:
        write_text(args.out, text)
        log.info("wrote %d table(s) from %d results file(s) to %s", len(built), len(results), args.out)
    else:
        sys.stdout.write(text)
    return 0


def zero_shot_table(paths: list[str], fmt: str, out: str | None, published: str | None = None) -> int:
    """VOC21 ... ADE and Average from zero-shot benchmark results (fewshot/zeroshot/benchmarks/table.py), with the
    published rows of `published` (fewshot/zeroshot/benchmarks/published.yaml) below them."""
    from fewshot.zeroshot.benchmarks import table

    try:
        rows = table.build_rows(tables.find_results(paths)) if paths else []
        rows += table.load_published(published) if published else []
        text = table.render(rows, "csv" if fmt == "csv" else "markdown")
    except (table.ZeroShotTableError, tables.TableError) as err:
        log.error("%s", err)
        return 2
    if out:
        write_text(out, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
