"""tools/test_fold.py checks before any work (outputs, a checkpoint's training classes) and what its results record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fewshot.checkpoint import save_weights
from fewshot.config import load_config
from fewshot.model import build_model
from tools import test_fold

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides of the demo config that make a test run take a second: 64 px synthetic data, 2 ViT blocks."""
    root = tmp_path_factory.mktemp("synthetic")
    return [
        f"data.root={root}", "data.synthetic.images=240", "data.synthetic.size=64", "data.image_size=64",
        "data.min_pixels=64", "data.episodes=12", "data.num_workers=0", "model.backbone.layers=[0, 1]",
        "eval.batch_size=4", "device=cpu",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fold0_checkpoint(tiny: list[str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """A best.safetensors whose stored config trained on fold 0 (untrained weights: only the config matters here)."""
    cfg = load_config(DEMO, [*tiny, "data.fold=0"])
    path = tmp_path_factory.mktemp("run") / "best.safetensors"
    save_weights(path, build_model(cfg.model), cfg)
    return str(path)


@pytest.fixture
def no_evaluation(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every evaluation that starts: a check made before the work leaves it empty."""
    started: list[str] = []
    monkeypatch.setattr(test_fold, "evaluate_fold", lambda cfg, *args, **kwargs: started.append(cfg.data.fold))
    return started


def test_a_checkpoint_is_refused_on_folds_whose_novel_classes_it_trained_on(
    tiny, fold0_checkpoint, tmp_path, capsys, no_evaluation
):
    out = tmp_path / "results"
    args = [DEMO, *tiny, "--folds", "0", "1", "2", "--checkpoint", fold0_checkpoint, "--out", str(out)]
    assert test_fold.main(args) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {fold0_checkpoint} was trained on synthetic fold 0" in err
    assert "fold 1's novel classes" in err and "--allow-trained-classes" in err
    assert no_evaluation == [] and not list(out.glob("*.json"))  # refused before fold 0 ran


def test_allowed_trained_classes_are_recorded_and_the_training_fold_always(tiny, fold0_checkpoint, tmp_path, capsys):
    out = tmp_path / "f1.json"
    args = [DEMO, *tiny, "data.fold=1", "--checkpoint", fold0_checkpoint, "--allow-trained-classes"]
    assert test_fold.main([*args, "--out", str(out)]) == 0
    proto = json.loads(out.read_text())["protocol"]
    assert proto["trained_dataset"] == "synthetic" and proto["trained_fold"] == 0
    assert proto["trained_classes_tested"] == [6, 7, 8, 9, 10]
    assert "testing classes [6, 7, 8, 9, 10]" in capsys.readouterr().err
    assert test_fold.main([DEMO, *tiny, "--checkpoint", fold0_checkpoint, "--out", str(out)]) == 0
    proto = json.loads(out.read_text())["protocol"]
    assert proto["trained_fold"] == 0 and proto["trained_classes_tested"] == []
    assert test_fold.main([DEMO, *tiny, "data.fold=2", "--out", str(out)]) == 0  # no checkpoint: nothing trained
    proto = json.loads(out.read_text())["protocol"]
    assert proto["trained_fold"] is None and proto["trained_dataset"] is None and proto["trained_classes_tested"] == []


def test_unwritable_outputs_are_refused_before_the_evaluation(tiny, tmp_path, capsys, no_evaluation):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [
        (["--out", str(tmp_path)], "is a folder"),  # one run writes a file
        (["--out", str(blocker / "results.json")], f"{blocker} is a file, not a folder"),
        (["--folds", "0", "1", "--out", str(blocker)], "is a file, but a folder is written there"),
        (["eval.overlays=[0]", "--out", str(tmp_path / "ok.json"), "--folds", "0"], None),
        (["eval.overlays=[12]", "--out", str(tmp_path / "r.json")], "eval.overlays: episodes [12] do not exist"),
    ]
    (tmp_path / "ok_overlays").write_text("")  # the overlays folder of ok.json is taken by a file
    for extra, message in cases:
        assert test_fold.main([DEMO, *tiny, *extra]) == 2
        assert (message or "the overlays folder") in capsys.readouterr().err
    assert no_evaluation == []


def test_absent_classes_are_left_out_of_miou_and_named(tiny, tmp_path, capsys):
    out = tmp_path / "few.json"
    assert test_fold.main([DEMO, *tiny, "data.episodes=2", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    tested = {c: v for c, v in results["class_iou"].items() if v is not None}
    absent = sorted(int(c) for c, v in results["class_iou"].items() if v is None)
    assert 1 <= len(tested) <= 2 and results["absent_classes"] == absent and len(absent) >= 3
    assert results["miou"] == pytest.approx(sum(tested.values()) / len(tested))
    assert results["seeds"][0]["absent_classes"] == absent
    assert f"classes {absent} had no test episode" in capsys.readouterr().err


def test_the_episode_file_and_its_sha256_are_recorded(tiny, tmp_path):
    import hashlib

    from tools import export_episodes

    path, out = tmp_path / "episodes.json", tmp_path / "r.json"
    assert export_episodes.main([DEMO, *tiny, "--out", str(path)]) == 0
    assert test_fold.main([DEMO, *tiny, f"data.episode_file={path}", "--out", str(out)]) == 0
    proto = json.loads(out.read_text())["protocol"]
    assert proto["episode_file"] == str(path)
    assert proto["episode_file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert test_fold.main([DEMO, *tiny, "--out", str(out)]) == 0
    assert "episode_file" not in json.loads(out.read_text())["protocol"]  # sampled: nothing to record
