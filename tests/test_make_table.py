"""tools/make_table.py and fewshot/tables.py: printed numbers, the three formats, protocol checks, published rows."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
import statistics
from pathlib import Path

import pytest
import yaml

from fewshot import tables

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "configs" / "published.yaml"
PROTOCOL_MD = REPO.parent / "shared" / "PROTOCOL.md"

_spec = importlib.util.spec_from_file_location("make_table", REPO / "tools" / "make_table.py")
make_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_table)

FOLD_MIOU = {1: [61.2, 55.1, 60.0, 58.5], 5: [66.0, 60.3, 64.1, 62.4]}
FOLD_FBIOU = [70.0, 72.0, 71.0, 73.0]
PROTOCOL = {
    "dataset": "pascal", "split": "val", "lists": "pfenet", "sampler": "native", "ways": 1, "episodes": 1000,
    "seeds": [0], "min_pixels": 2048, "novel_in_train": "background", "resize": "square",
    "image_size": 400, "eval_resolution": "resized", "backbone": "timm:vit_base_patch16_224",
    "pretrained": "augreg_in21k", "head": "prototype", "shot_fusion": "model", "model": "prototype_vit_base",
    "checkpoint": "", "git": "abc1234", "num_folds": 4,
}  # fmt: skip


def write_result(root: Path, method: str, fold: int, shots: int, miou: float, fbiou: float = 70.0, **proto) -> Path:
    """A results file as tools/test_fold.py writes it, under root/method/fold{f}_{k}shot.json."""
    path = root / method / f"fold{fold}_{shots}shot.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    coco = {"coco_split": "interleaved", "coco_crowd": "ignore"} if proto.get("dataset") == "coco" else {}
    protocol = {**PROTOCOL, **coco, "fold": fold, "shots": shots, **proto}
    seeds = [{"seed": s, "miou": miou, "fbiou": fbiou} for s in protocol["seeds"]]
    data = {"miou": miou, "fbiou": fbiou, "miou_std": 0.0, "fbiou_std": 0.0, "seeds": seeds, "method": method}
    path.write_text(json.dumps({**data, "episodes": protocol["episodes"], "protocol": protocol}))
    return path


def four_folds(root: Path, method: str = "proto", shots: tuple[int, ...] = (1, 5), **proto) -> None:
    for k in shots:
        for fold, miou in enumerate(FOLD_MIOU[k]):
            write_result(root, method, fold, k, miou, FOLD_FBIOU[fold], **proto)


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = make_table.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def markdown_rows(text: str) -> dict[str, dict[str, str]]:
    """label -> {column header -> cell} for every markdown table in `text`."""
    rows: dict[str, dict[str, str]] = {}
    header: list[str] = []
    for line in text.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells[0] == "Method":
            header = cells
        else:
            rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_four_fold_table_mean_is_mean_of_folds(tmp_path, capsys):
    four_folds(tmp_path)
    code, out, _ = run([tmp_path], capsys)
    assert code == 0
    row = markdown_rows(out)["proto"]
    for k, values in FOLD_MIOU.items():
        assert [row[f"{k}-shot fold {f}"] for f in range(4)] == [f"{v:.1f}" for v in values]
        assert row[f"{k}-shot mean"] == f"{statistics.fmean(values):.1f}"
        assert row[f"{k}-shot FB-IoU"] == "71.5"
    assert row["1-shot mean"] == "58.7" and row["5-shot mean"] == "63.2"
    assert "### PASCAL-5i" in out and "episodes=1000" in out


def test_missing_fold_shows_dash_and_no_mean(tmp_path, capsys):
    four_folds(tmp_path, shots=(1,))
    for fold in (0, 1, 2):
        write_result(tmp_path, "proto", fold, 5, FOLD_MIOU[5][fold])
    row = markdown_rows(run([tmp_path], capsys)[1])["proto"]
    assert row["5-shot fold 3"] == row["5-shot mean"] == row["5-shot FB-IoU"] == "-"
    assert row["5-shot fold 0"] == "66.0" and row["1-shot mean"] == "58.7"


def test_csv_parses_with_one_column_per_number(tmp_path, capsys):
    four_folds(tmp_path, method="proto_vit")
    four_folds(tmp_path, method="other", shots=(1,))
    code, out, _ = run([tmp_path, "--format", "csv"], capsys)
    assert code == 0
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(out))}
    assert set(rows) == {"proto_vit", "other"}
    assert rows["proto_vit"]["dataset"] == "PASCAL-5i" and rows["proto_vit"]["published"] == "no"
    assert float(rows["proto_vit"]["1shot_mean"]) == pytest.approx(58.7)
    assert [float(rows["proto_vit"][f"5shot_fold{f}"]) for f in range(4)] == FOLD_MIOU[5]
    assert rows["other"]["5shot_mean"] == "" and rows["other"]["1shot_fbiou"] == "71.5"
    assert "lists=pfenet" in rows["other"]["protocol"]


def test_latex_is_a_booktabs_tabular_with_escaped_labels(tmp_path, capsys):
    four_folds(tmp_path, method="proto_vit")
    code, out, _ = run([tmp_path, "--format", "latex"], capsys)
    assert code == 0
    assert out.count(r"\begin{tabular}{l" + "c" * 12 + "}") == 1 and r"\end{tabular}" in out
    assert r"\multicolumn{6}{c}{1-shot} & \multicolumn{6}{c}{5-shot} \\" in out
    line = next(li for li in out.splitlines() if li.startswith("proto"))
    cells = line.removesuffix(r" \\").split(" & ")
    assert cells[0] == r"proto\_vit" and len(cells) == 13
    assert cells[1:7] == ["61.2", "55.1", "60.0", "58.5", "58.7", "71.5"]


def test_std_over_seeds(tmp_path, capsys):
    for fold in range(4):
        path = write_result(tmp_path, "proto", fold, 1, 60.0, seeds=[0, 1])
        data = json.loads(path.read_text())
        data["seeds"] = [{"seed": 0, "miou": 59.0 + fold}, {"seed": 1, "miou": 61.0 - fold}]
        data["miou_std"] = abs(1.0 - fold)
        path.write_text(json.dumps(data))
    row = markdown_rows(run([tmp_path, "--std"], capsys)[1])["proto"]
    # per seed the fold mean is 60.5 (seed 0) and 59.5 (seed 1): spread 0.5
    assert row["1-shot fold 2"] == "60.0 ± 1.0" and row["1-shot mean"] == "60.0 ± 0.5"


def test_protocol_mismatch_refused_naming_the_field(tmp_path, capsys):
    four_folds(tmp_path, shots=(1,))
    odd = write_result(tmp_path, "other", 0, 1, 50.0, episodes=5000)
    code, out, err = run([tmp_path], capsys)
    assert code == 2 and out == ""
    assert "episodes" in err and "5000" in err and "1000" in err and str(odd) in err
    assert "--allow-mixed-protocols" in err
    with pytest.raises(tables.TableError, match=r"differing fields: episodes\n"):
        tables.build_tables([tables.load_result(p) for p in tables.find_results([tmp_path])])


def test_mixed_protocols_allowed_with_flag_and_shown_in_labels(tmp_path, capsys):
    four_folds(tmp_path, shots=(1,))
    write_result(tmp_path, "other", 0, 1, 50.0, episodes=5000, eval_resolution="original")
    code, out, _ = run([tmp_path, "--allow-mixed-protocols"], capsys)
    assert code == 0
    rows = markdown_rows(out)
    assert rows["other [episodes=5000, eval_resolution=original]"]["1-shot fold 0"] == "50.0"
    assert rows["proto [episodes=1000, eval_resolution=resized]"]["1-shot mean"] == "58.7"
    assert "mixed: episodes, eval_resolution" in out


def test_episodes_of_two_samplers_never_share_a_column(tmp_path, capsys):
    four_folds(tmp_path, shots=(1,))
    hsnet = write_result(tmp_path, "hsnet_episodes", 0, 1, 50.0, sampler="hsnet", lists="hsnet")
    for flags in ([], ["--allow-mixed-protocols"]):
        code, out, err = run([tmp_path, *flags], capsys)
        assert code == 2 and out == ""
        assert re.search(rf"\n  sampler: (hsnet \({re.escape(str(hsnet))}\); native|native .*; hsnet)", err)
        assert "sampler cannot be mixed, even with --allow-mixed-protocols" in err
    four_folds(tmp_path / "old", "old", shots=(1,))  # written before data.sampler: its episodes were native
    for path in (tmp_path / "old").rglob("*.json"):
        stored = json.loads(path.read_text())
        del stored["protocol"]["sampler"]
        path.write_text(json.dumps(stored))
    code, out, _ = run([tmp_path / "old", tmp_path / "proto"], capsys)
    assert code == 0 and {"old", "proto"} <= set(markdown_rows(out))
    assert run([tmp_path / "old", hsnet], capsys)[0] == 2


@pytest.mark.parametrize(
    ("field", "value", "other"),
    [
        ("lists", "hsnet", "pfenet"),
        ("seeds", [0, 1], "[0]"),
        ("pretrained", "none", "weights"),
        ("split", "trn", "val"),
    ],
)
def test_each_compared_field_is_refused(tmp_path, field, value, other):
    four_folds(tmp_path, shots=(1,))
    write_result(tmp_path, "other", 0, 1, 50.0, **{field: value})
    results = [tables.load_result(p) for p in tables.find_results([tmp_path])]
    with pytest.raises(tables.TableError, match=rf"differing fields: {field}\n(.|\n)*{re.escape(other)}"):
        tables.build_tables(results)


def test_free_fields_may_differ(tmp_path, capsys):
    four_folds(tmp_path, shots=(1,), seeds=[1, 0])
    other = {"backbone": "open_clip:ViT-B-16", "head": "transformer", "git": "def5678", "shot_fusion": "vote"}
    write_result(tmp_path, "other", 0, 1, 50.0, seeds=[0, 1], model="x", **other)
    write_result(tmp_path, "coco_run", 0, 1, 40.0, dataset="coco", seeds=[0, 1], coco_split="consecutive")
    code, out, _ = run([tmp_path], capsys)
    assert code == 0
    assert "### PASCAL-5i" in out and "### COCO-20i" in out
    rows = markdown_rows(out)
    assert rows["other"]["1-shot fold 0"] == "50.0" and rows["coco_run"]["1-shot fold 0"] == "40.0"


def test_random_init_is_marked(tmp_path, capsys):
    four_folds(tmp_path, shots=(1,), pretrained="none")
    rows = markdown_rows(run([tmp_path], capsys)[1])
    assert rows["proto (random init)"]["1-shot mean"] == "58.7"


def test_missing_fields_are_named(tmp_path, capsys):
    path = write_result(tmp_path, "proto", 0, 1, 60.0)
    data = json.loads(path.read_text())
    del data["fbiou"], data["protocol"]["lists"], data["protocol"]["eval_resolution"]
    path.write_text(json.dumps(data))
    code, _, err = run([path], capsys)
    assert code == 2
    assert str(path) in err and "fbiou" in err and "protocol.lists" in err and "protocol.eval_resolution" in err
    assert "protocol.episodes" not in err


def test_bad_values_and_paths_are_named(tmp_path):
    path = write_result(tmp_path, "proto", 0, 1, 0.0)
    path.write_text(path.read_text().replace('"miou": 0.0', '"miou": 612.0'))
    with pytest.raises(tables.TableError, match="miou=612.0 is not a percentage"):
        tables.load_result(path)
    path.write_text("{not json")
    with pytest.raises(tables.TableError, match=re.escape(str(path))):
        tables.load_result(path)
    with pytest.raises(tables.TableError, match="does not exist"):
        tables.find_results([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(tables.TableError, match="no results.json"):
        tables.find_results([tmp_path / "empty"])


def test_folder_search_takes_results_files_only(tmp_path):
    four_folds(tmp_path, shots=(1,))
    (tmp_path / "proto" / "config.json").write_text("{}")
    named = write_result(tmp_path / "deep" / "run", "x", 0, 1, 50.0).rename(tmp_path / "deep" / "results.json")
    found = tables.find_results([tmp_path, named])
    assert len(found) == 5 and named.resolve() in found
    assert all(p.name != "config.json" for p in found)


def test_duplicate_cell_and_mixed_models_in_a_row_are_refused(tmp_path):
    a = write_result(tmp_path / "a", "proto", 0, 1, 60.0)
    b = write_result(tmp_path / "b", "proto", 0, 1, 61.0)
    with pytest.raises(tables.TableError, match=f"two results .*{re.escape(str(a))}.*{re.escape(str(b))}"):
        tables.build_tables([tables.load_result(a), tables.load_result(b)])
    c = write_result(tmp_path / "c", "proto", 1, 1, 61.0, backbone="timm:resnet50")
    with pytest.raises(tables.TableError, match="mixes models: backbone differs"):
        tables.build_tables([tables.load_result(a), tables.load_result(c)])


def test_published_rows_added_and_marked(tmp_path, capsys):
    four_folds(tmp_path)
    code, out, _ = run([tmp_path, "--published", PUBLISHED, "--published-only", "HSNet", "GF-SAM"], capsys)
    assert code == 0
    rows = markdown_rows(out)
    hsnet = rows["HSNet (RN50) [published; lists=hsnet; sampler=hsnet]"]  # measured rows: native episodes
    assert (hsnet["1-shot mean"], hsnet["5-shot mean"]) == ("64.0", "69.5")
    assert hsnet["1-shot fold 0"] == hsnet["1-shot FB-IoU"] == "-"
    assert rows["HSNet (RN101) [published; lists=hsnet; sampler=hsnet]"]["5-shot mean"] == "70.4"
    assert rows["GF-SAM (DINOv2 + SAM) [published; sampler=hsnet]"]["5-shot mean"] == "82.6"
    assert rows["proto"]["1-shot mean"] == "58.7"
    assert not any(label.startswith(("PANet", "BAM")) for label in rows)
    assert "github.com/juhongm999/hsnet" in out and "### COCO-20i" not in out


def test_rows_on_hsnets_episodes_sit_beside_the_hsnet_family_unmarked(tmp_path, capsys):
    four_folds(tmp_path, sampler="hsnet", lists="hsnet")
    code, out, _ = run([tmp_path, "--published", PUBLISHED, "--published-only", "HSNet", "GF-SAM", "PFENet"], capsys)
    assert code == 0
    labels = set(markdown_rows(out))
    assert {"HSNet (RN50) [published]", "GF-SAM (DINOv2 + SAM) [published]"} <= labels
    assert any(label.startswith("PFENet (RN50) [published; ") and "sampler=pfenet" in label for label in labels)


def test_published_protocol_notes_on_coco(tmp_path, capsys):
    four_folds(tmp_path, dataset="coco")
    code, out, _ = run(
        [tmp_path, "--format", "csv", "--published", PUBLISHED, "--published-only", "PANet,FPTrans"], capsys
    )
    assert code == 0
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(out))}
    panet = rows["PANet (VGG16) [published; coco_split=consecutive]"]
    assert panet["published"] == "yes" and panet["1shot_mean"] == "20.9" and panet["1shot_fold0"] == ""
    assert rows["FPTrans (DeiT-B/16) [published]"]["5shot_mean"] == "58.9"
    assert {r["dataset"] for r in rows.values()} == {"COCO-20i"}


def test_published_only_without_results_and_bad_names(capsys):
    code, out, _ = run(["--published", PUBLISHED, "--published-only", "LSeg"], capsys)
    assert code == 0
    rows = markdown_rows(out)
    assert rows["LSeg (ResNet-101) [published]"]["zero-shot mean"] == "47.4"
    assert rows["LSeg [published]"]["zero-shot mean"] == "23.4"
    code, _, err = run(["--published", PUBLISHED, "--published-only", "HSNett"], capsys)
    assert code == 2 and "HSNett" in err and "HSNet (RN101)" in err
    with pytest.raises(SystemExit):
        make_table.main(["--published-only", "HSNet"])


def test_bad_published_file_is_named(tmp_path):
    bad = tmp_path / "pub.yaml"
    bad.write_text(yaml.safe_dump({"methods": [{"name": "X", "source": "s", "results": [{"dataset": "pascal"}]}]}))
    with pytest.raises(
        tables.TableError, match=r"pub.yaml: methods\[0\] \(X\).results\[0\]: .*missing keys \['shots'\]"
    ):
        tables.load_published(bad)
    entry = {"dataset": "pascal", "shots": 1, "miou": 50.0, "folds": [40.0, 50.0, 60.0, 70.0]}
    bad.write_text(yaml.safe_dump({"methods": [{"name": "X", "source": "s", "results": [entry]}]}))
    with pytest.raises(tables.TableError, match="not the mean of folds"):
        tables.load_published(bad)
    entry["protocol"] = {"episdoes": 1000}
    entry["miou"] = 55.0
    bad.write_text(yaml.safe_dump({"methods": [{"name": "X", "source": "s", "results": [entry]}]}))
    with pytest.raises(tables.TableError, match="unknown protocol keys \\['episdoes'\\]"):
        tables.load_published(bad)


SAM_METHODS_ROWS = ("PerSAM", "PerSAM-F")  # published rows that ../shared/SAM_METHODS.md's summary table gives


def sam_methods_rows() -> set[tuple[str, str, int, float]]:
    """(name, dataset, shots, mean) of the PerSAM rows of SAM_METHODS.md's one-screen summary (its 1-shot PASCAL /
    COCO / FSS-1000 column; FSS-1000 there is HSNet's protocol, not the cross-domain table's, so it is not listed)."""
    lines = (PROTOCOL_MD.parent / "SAM_METHODS.md").read_text().split("## 0.")[1].split("\n## ")[0].splitlines()
    rows = set()
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in SAM_METHODS_ROWS:
            numbers = [re.search(r"\d+\.\d", part) for part in cells[4].split("/")]
            for dataset, number in zip(("pascal", "coco", "fss1000"), numbers, strict=True):
                rows.add((cells[0], dataset, 1, float(number.group())))
    return rows


def test_published_numbers_match_protocol_md():
    """Every mean in configs/published.yaml is the one in ../shared/PROTOCOL.md's table, and none is left out."""
    if not PROTOCOL_MD.is_file():
        pytest.skip(f"{PROTOCOL_MD} not found")
    lines = PROTOCOL_MD.read_text().split("## Published numbers")[1].split("\n## ")[0].splitlines()
    table = [[c.strip() for c in li.strip("|").split("|")] for li in lines if li.startswith("|") and "---" not in li]
    expected = set()
    for method, pascal, coco in table[1:]:
        for dataset, cell in (("pascal", pascal), ("coco", coco)):
            numbers = re.findall(r"\d+\.\d", cell)
            shots = [0] if "zero-shot" in method else [1, 5]
            expected |= {(method.split()[0], dataset, k, float(v)) for k, v in zip(shots, numbers, strict=False)}
    published = [p for p in tables.load_published(PUBLISHED) if p.dataset in ("pascal", "coco")]  # PROTOCOL.md's table
    got = {(p.name, p.dataset, p.shots, p.mean) for p in published}
    sam_only = {row for row in got if row[0] in SAM_METHODS_ROWS}  # not in PROTOCOL.md: SAM_METHODS.md's summary
    assert sam_only == {row for row in sam_methods_rows() if row[1] in ("pascal", "coco")}
    assert got - sam_only == expected
    assert all(p.source and p.folds == (None,) * 4 for p in published)
    panet_coco = [p for p in published if p.name == "PANet" and p.dataset == "coco"]
    assert panet_coco and all(p.protocol["coco_split"] == "consecutive" for p in panet_coco)


def test_out_is_written(tmp_path, capsys):
    four_folds(tmp_path / "runs")
    run([tmp_path / "runs", "--format", "csv"], capsys)
    printed = run([tmp_path / "runs", "--format", "csv"], capsys)[1]
    code, out, _ = run([tmp_path / "runs", "--format", "csv", "--out", tmp_path / "table.csv"], capsys)
    assert code == 0 and out == ""
    assert (tmp_path / "table.csv").read_text() == printed


def test_cells_with_absent_or_trained_classes_are_marked_with_their_reason(tmp_path, capsys):
    four_folds(tmp_path, shots=(1,))
    absent, trained = tmp_path / "proto" / "fold1_1shot.json", tmp_path / "proto" / "fold2_1shot.json"
    data = json.loads(absent.read_text())
    absent.write_text(json.dumps({**data, "absent_classes": [7, 9]}))
    data = json.loads(trained.read_text())
    data["protocol"].update(trained_dataset="pascal", trained_fold=0, trained_classes_tested=[11, 12])
    trained.write_text(json.dumps(data))
    write_result(tmp_path, "clean", 0, 1, 50.0, trained_dataset="pascal", trained_fold=0, trained_classes_tested=[])
    code, out, _ = run([tmp_path], capsys)
    assert code == 0
    row, clean = markdown_rows(out)["proto"], markdown_rows(out)["clean"]
    assert [row[f"1-shot fold {f}"] for f in range(4)] == ["61.2", "55.1†", "60.0†", "58.5"]
    assert row["1-shot mean"] == "58.7†" and row["1-shot FB-IoU"] == "71.5†" and clean["1-shot fold 0"] == "50.0"
    assert f"- proto, 1-shot fold 1 ({absent.resolve()}): classes [7, 9] had no test episode" in out
    assert f"- proto, 1-shot fold 2 ({trained.resolve()}): tested on classes [11, 12] the checkpoint was" in out
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(run([tmp_path, "--format", "csv"], capsys)[1]))}
    assert float(rows["proto"]["1shot_fold1"]) == 55.1 and rows["clean"]["caveats"] == ""
    assert "classes [7, 9] had no test episode" in rows["proto"]["caveats"] and "[11, 12]" in rows["proto"]["caveats"]
    latex = run([tmp_path, "--format", "latex"], capsys)[1]
    assert r"55.1$^\dagger$" in latex and "% dagger: proto, 1-shot fold 1" in latex
