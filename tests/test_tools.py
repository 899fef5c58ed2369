"""End to end through the tools' `main(argv)`: train a few steps on tiny synthetic data, then test, resume, shard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fewshot.config import ConfigError
from tools import test_fold, train_fold

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """Overrides of the demo config that make a run take seconds: 64 px synthetic data, 2 ViT blocks, 4 steps."""
    root = tmp_path_factory.mktemp("synthetic")
    return [
        f"data.root={root}",
        "data.synthetic.images=240",
        "data.synthetic.size=64",
        "data.image_size=64",
        "data.min_pixels=64",
        "data.episodes=12",
        "data.num_workers=0",
        "model.backbone.layers=[0, 1]",
        "train.max_iters=4",
        "train.batch_size=2",
        "train.val_every=2",
        "train.val_episodes=6",
        "train.checkpoint_every=2",
        "train.log_every=1",
        "eval.batch_size=4",
        "device=cpu",
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_then_test(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_fold.main([DEMO, *tiny, f"run.dir={run}"]) == 0
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "best.safetensors", "last.pt"}
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["split"] for r in records if r["split"] != "train"] == ["val_untrained", "val", "val"]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert torch.load(run / "last.pt", weights_only=False)["step"] == 4
    assert "val mIoU untrained" in capsys.readouterr().out

    out = tmp_path / "results.json"
    assert test_fold.main([DEMO, *tiny, "--checkpoint", str(run / "best.safetensors"), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["class_iou"]) == {"1", "2", "3", "4", "5"}  # fold 0's novel classes
    assert results["episodes"] == 12
    assert 0.0 <= results["miou"] <= 100.0 and 0.0 <= results["fbiou"] <= 100.0
    proto = results["protocol"]
    assert proto["fold"] == 0 and proto["shots"] == 1 and proto["pretrained"] == "none"
    assert proto["checkpoint"].endswith("best.safetensors")
    assert "fold 0, 1-shot" in capsys.readouterr().out


def test_test_without_checkpoint_several_folds_and_shots(tiny, tmp_path):
    out = tmp_path / "results"
    assert test_fold.main([DEMO, *tiny, "data.seeds=[0, 1]", "--folds", "0", "1", "--shots", "1", "2",
                           "--out", str(out)]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["fold0_1shot.json", "fold0_2shot.json", "fold1_1shot.json", "fold1_2shot.json"]
    results = json.loads((out / "fold1_2shot.json").read_text())
    assert set(results["class_iou"]) == {"6", "7", "8", "9", "10"}
    assert [s["seed"] for s in results["seeds"]] == [0, 1]
    assert results["miou"] == pytest.approx(sum(s["miou"] for s in results["seeds"]) / 2)


def test_run_dir_with_other_config_is_refused(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_fold.main([DEMO, *tiny, f"run.dir={run}", "train.max_iters=0"]) == 0
    assert train_fold.main([DEMO, *tiny, f"run.dir={run}", "train.max_iters=0", "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "already holds a different config" in err and "optim.lr" in err
    assert train_fold.main([DEMO, *tiny, f"run.dir={run}", "train.max_iters=0", "optim.lr=0.5",
                            "run.overwrite=true"]) == 0
    assert train_fold.main([DEMO, *tiny, f"run.dir={tmp_path / 'fresh'}", "--resume"]) == 2
    assert "holds no run" in capsys.readouterr().err


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "last.pt", weights_only=False)
    return {k: v for k, v in state["model"].items() if not k.startswith("backbone.")}


@pytest.mark.integration
def test_resume_after_sigkill_reaches_the_same_weights(tiny, tmp_path):
    args = [*tiny, "train.max_iters=8", "train.val_every=100", "train.checkpoint_every=2"]
    full = tmp_path / "full"
    assert train_fold.main([DEMO, *args, f"run.dir={full}"]) == 0

    cut = tmp_path / "cut"
    command = [sys.executable, str(REPO / "tools" / "train_fold.py"), DEMO, *args, f"run.dir={cut}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (cut / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(cut / "last.pt", weights_only=False)["step"]
    assert killed_at < 8, "the run finished before it could be killed"

    assert train_fold.main([DEMO, *args, f"run.dir={cut}", "--resume"]) == 0
    resumed, uninterrupted = _final_weights(cut), _final_weights(full)
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key


def _torchrun(tool: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "tools" / tool), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.mark.integration
def test_two_process_evaluation_equals_one_process(tiny, tmp_path):
    single, double = tmp_path / "single.json", tmp_path / "double.json"
    assert test_fold.main([DEMO, *tiny, "--out", str(single)]) == 0
    proc = _torchrun("test_fold.py", [DEMO, *tiny, "--out", str(double)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    for key in ("miou", "fbiou", "pixel_acc", "mean_pixel_acc", "episodes", "class_iou"):
        assert one[key] == pytest.approx(two[key], abs=1e-9), key


@pytest.mark.integration
def test_two_process_training_smoke(tiny, tmp_path):
    run = tmp_path / "ddp"
    proc = _torchrun("train_fold.py", [DEMO, *tiny, f"run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(run / "last.pt", weights_only=False)["step"] == 4
    assert (run / "best.safetensors").is_file()


def test_bad_input_is_reported(tiny, tmp_path, capsys):
    assert test_fold.main([DEMO, *tiny, "data.fold=7", "--out", str(tmp_path / "r.json")]) == 2
    assert "valid folds are 0, 1, 2, 3" in capsys.readouterr().err
    assert test_fold.main([DEMO, *tiny, "--checkpoint", str(tmp_path / "none.safetensors"),
                           "--out", str(tmp_path / "r.json")]) == 2
    assert "none.safetensors does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(ConfigError):
        from fewshot.config import load_config

        load_config(DEMO, ["data.root=x", "data.shotz=1"])


def test_overlays_are_written_for_chosen_episodes(tiny, tmp_path):
    from PIL import Image

    out = tmp_path / "r" / "results.json"
    assert test_fold.main([DEMO, *tiny, "data.shots=2", "eval.overlays=[0, 3]", "--out", str(out)]) == 0
    pngs = sorted((tmp_path / "r" / "results_overlays").glob("*.png"))
    assert [p.name.split("_")[0] for p in pngs] == ["episode00000", "episode00003"]
    with Image.open(pngs[0]) as image:
        assert image.size == (64 * 4, 64)  # two supports, ground truth, prediction


def test_original_resolution_scoring_with_keep_aspect_resize(tiny, tmp_path):
    out = tmp_path / "orig.json"
    args = [*tiny, "data.resize=keep_aspect", "data.eval_resolution=original", "data.image_size=48"]
    assert test_fold.main([DEMO, *args, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["protocol"]["eval_resolution"] == "original" and results["protocol"]["resize"] == "keep_aspect"
    assert 0.0 <= results["miou"] <= 100.0


def test_score_at_original_resolution_crops_the_padding():
    from fewshot.engine import score_at_original_resolution

    logits = torch.zeros(2, 8, 8)
    logits[1, :4, :] = 1.0  # foreground over the top half, which holds the whole image for a 20 x 40 label
    logits[1, 4:, :] = 5.0  # padding: must be cropped away, not stretched into the label
    pred = score_at_original_resolution(logits, (20, 40), keep_aspect=True)
    assert pred.shape == (20, 40) and bool(pred.all())
    logits[1, :4, :] = -1.0
    assert not score_at_original_resolution(logits, (20, 40), keep_aspect=True).any()
    assert score_at_original_resolution(logits, (20, 40), keep_aspect=False)[-1].all()  # square: stretched
