"""End to end through the tools' `main(argv)`: train a few steps on tiny synthetic data, then test, resume, shard;
and the faults of a run (divergence, kills, signals, foreign files) with what a user gets instead."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fewshot.checkpoint import read_weights
from fewshot.config import ConfigError
from fewshot.io import TEMPORARY
from fewshot.model import build_model
from tools import test_fold, train_fold

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """Overrides of the demo config that make a run take seconds: 64 px synthetic data, 2 ResNet stages, 4 steps."""
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
    assert proto["checkpoint"].endswith("best.safetensors") and proto["backbone_trained"] is True
    assert "fold 0, 1-shot" in capsys.readouterr().out


def test_trained_backbone_is_in_the_checkpoint(tiny, tmp_path):
    """The demo trains its random backbone: best.safetensors holds it (norm statistics too), so testing the checkpoint
    on the validation episodes gives the validation mIoU it was saved with."""
    run = tmp_path / "run"
    assert train_fold.main([DEMO, *tiny, f"run.dir={run}"]) == 0
    state, cfg, meta = read_weights(run / "best.safetensors")
    assert not cfg.model.backbone.frozen and any(k.endswith("running_mean") for k in state if k.startswith("backbone."))
    torch.manual_seed(cfg.seed)  # as train_fold builds the model: its initial weights
    initial = build_model(cfg.model).backbone.state_dict()
    convs = [k for k in initial if k.endswith("conv1.weight")]
    assert convs and all(not torch.equal(state[f"backbone.{k}"], initial[k]) for k in convs), "the backbone is as built"
    out = tmp_path / "val.json"
    val = ["data.seeds=[1000]", "data.episodes=6"]  # train.val_seed and train.val_episodes of `tiny`
    assert test_fold.main([DEMO, *tiny, *val, "--checkpoint", str(run / "best.safetensors"), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["miou"] == pytest.approx(meta["val_miou"], abs=1e-9)


def test_test_without_checkpoint_several_folds_and_shots(tiny, tmp_path):
    out = tmp_path / "results"
    assert (
        test_fold.main([DEMO, *tiny, "data.seeds=[0, 1]", "--folds", "0", "1", "--shots", "1", "2", "--out", str(out)])
        == 0
    )
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
    assert (
        train_fold.main([DEMO, *tiny, f"run.dir={run}", "train.max_iters=0", "optim.lr=0.5", "run.overwrite=true"]) == 0
    )
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
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tools" / tool),
        *args,
    ]
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
    run.mkdir()
    (run / ".last.pt.0a1b2c3d.tmp").write_bytes(b"left by a kill")  # removed by the main process alone
    proc = _torchrun("train_fold.py", [DEMO, *tiny, f"run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(run / "last.pt", weights_only=False)["step"] == 4
    assert (run / "best.safetensors").is_file()
    assert not [p.name for p in run.iterdir() if TEMPORARY.fullmatch(p.name)]


def test_bad_input_is_reported(tiny, tmp_path, capsys):
    assert test_fold.main([DEMO, *tiny, "data.fold=7", "--out", str(tmp_path / "r.json")]) == 2
    assert "valid folds are 0, 1, 2, 3" in capsys.readouterr().err
    assert (
        test_fold.main(
            [DEMO, *tiny, "--checkpoint", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "r.json")]
        )
        == 2
    )
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


# --------------------------------------------------------------------------------------------------------------------
# Faults of a run, and what a user gets instead.


def _run_files(run: Path) -> set[str]:
    return {p.name for p in run.iterdir()}


def test_nonfinite_loss_stops_the_run_and_saves_nothing_of_it(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    args = [
        DEMO,
        *tiny,
        f"run.dir={run}",
        "train.max_iters=8",
        "optim.lr=1e6",
        "optim.grad_clip=0.0",
        "loss.dice=0.0",
        "model.backbone.name=timm:vit_tiny_patch16_224",
    ]  # a loss that overflows (the ResNet's weights go first)
    assert train_fold.main(args) == 1
    err = capsys.readouterr().err
    diverged = re.search(r"training diverged: the loss is (nan|inf) at step (\d+); nothing from then on was saved", err)
    assert diverged, err
    assert "Try a lower optim.lr (now 1e+06) or gradient clipping (optim.grad_clip=1.0)" in err
    step = int(diverged[2])
    assert max(r["step"] for r in read_jsonl(run / "metrics.jsonl")) < step
    from fewshot.checkpoint import read_weights

    state, _, meta = read_weights(run / "best.safetensors")
    assert meta["step"] < step and all(bool(v.isfinite().all()) for v in state.values())
    last = torch.load(run / "last.pt", weights_only=False)  # the state of the last checkpoint before it stays
    assert last["step"] < step and f"last.pt holds step {last['step']}" in err
    assert all(bool(v.isfinite().all()) for v in last["model"].values() if v.is_floating_point())


def test_resume_refuses_a_last_pt_of_another_config(tiny, tmp_path, capsys, monkeypatch):
    other, run = tmp_path / "other", tmp_path / "run"
    assert train_fold.main([DEMO, *tiny, f"run.dir={other}", "optim.lr=0.5"]) == 0
    assert train_fold.main([DEMO, *tiny, f"run.dir={run}"]) == 0
    (run / "last.pt").write_bytes((other / "last.pt").read_bytes())  # copied in
    assert train_fold.main([DEMO, *tiny, f"run.dir={run}", "train.max_iters=6", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'last.pt'} was trained with a different config (differs in ['optim.lr'])" in err
    assert torch.load(run / "last.pt", weights_only=False)["step"] == 4  # nothing was trained from it

    # run.overwrite=true over `other`, with a run that dies before its first checkpoint: the old last.pt must not
    # be resumed under the new config
    import fewshot.trainer

    def dies_early(*args, **kwargs):
        raise ValueError("out of memory, say")

    monkeypatch.setattr(fewshot.trainer, "build_model", dies_early)
    assert train_fold.main([DEMO, *tiny, f"run.dir={other}", "run.overwrite=true"]) == 2
    monkeypatch.undo()
    assert train_fold.main([DEMO, *tiny, f"run.dir={other}", "--resume"]) == 2
    assert "no last.pt" in capsys.readouterr().err


def test_a_run_directory_with_results_is_not_started_over_silently(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_fold.main([DEMO, *tiny, f"run.dir={run}"]) == 0
    metrics = (run / "metrics.jsonl").read_text()
    assert train_fold.main([DEMO, *tiny, f"run.dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run of this config and its results (metrics.jsonl, last.pt, best.safetensors)" in err
    assert "add --resume" in err and "run.overwrite=true" in err
    assert (run / "metrics.jsonl").read_text() == metrics
    assert train_fold.main([DEMO, *tiny, f"run.dir={run}", "train.max_iters=6"]) == 2  # a resumable change
    assert "add --resume to continue it" in capsys.readouterr().err

    # run.overwrite=true starts over: the old results go, none of them mixes with the new run's
    assert train_fold.main([DEMO, *tiny, f"run.dir={run}", "train.max_iters=0", "run.overwrite=true"]) == 0
    assert [r["split"] for r in read_jsonl(run / "metrics.jsonl")] == ["val_untrained"]
    assert "best.safetensors" not in _run_files(run)

    # killed before its first checkpoint: nothing to resume, so no --resume in the advice
    (run / "last.pt").unlink()
    assert train_fold.main([DEMO, *tiny, f"run.dir={run}", "train.max_iters=0"]) == 2
    assert "--resume" not in capsys.readouterr().err

    # a directory holding only a config.yaml (its run stopped before writing anything) is reused
    (run / "metrics.jsonl").unlink()
    assert train_fold.main([DEMO, *tiny, f"run.dir={run}", "optim.lr=0.5"]) == 0


def test_run_time_faults_are_reported_without_a_traceback(tiny, tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert train_fold.main([DEMO, *tiny, f"run.dir={afile}"]) == 2
    assert f"run.dir={afile} is a file, not a directory" in capsys.readouterr().err
    assert train_fold.main([DEMO, *tiny, f"run.dir={afile / 'run'}"]) == 2
    assert f"run.dir={afile / 'run'} cannot be written" in capsys.readouterr().err

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_fold.main([DEMO, *tiny, f"run.dir={tmp_path / 'gpu'}", "device=cuda"]) == 2
    assert "device='cuda' but CUDA is not available here" in capsys.readouterr().err
    assert test_fold.main([DEMO, *tiny, "device=cuda", "--out", str(tmp_path / "r.json")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    monkeypatch.undo()

    run = tmp_path / "run"
    assert train_fold.main([DEMO, *tiny, f"run.dir={run}"]) == 0
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    assert train_fold.main([DEMO, *tiny, f"run.dir={run}", "train.max_iters=6", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'last.pt'} is truncated or corrupt" in err and "run.overwrite=true" in err


def test_a_checkpoint_of_another_backbone_width_is_named(tiny, tmp_path, capsys):
    from safetensors.torch import save_file

    from fewshot.checkpoint import read_weights
    from fewshot.config import dump_yaml

    run = tmp_path / "run"
    assert train_fold.main([DEMO, *tiny, f"run.dir={run}", "model.backbone.name=timm:vit_tiny_patch16_224"]) == 0
    state, cfg, _ = read_weights(run / "best.safetensors")
    cfg.model.backbone.name = "timm:vit_small_patch16_224"  # 384 wide, the weights are ViT-Tiny's 192
    wrong = tmp_path / "wrong.safetensors"
    save_file(state, str(wrong), metadata={"config": dump_yaml(cfg), "format": "fewshot-seg/1"})
    assert test_fold.main([DEMO, *tiny, "--checkpoint", str(wrong), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    named = (
        rf"checkpoint {wrong} does not fit the configured model: backbone\.[\w.]+ is \[192\] in the file but "
        r"\[384\] in the model \(and \d+ more tensors\)"
    )
    assert re.search(named, err), err


def test_every_file_a_run_writes_has_the_umask_mode(tiny, tmp_path):
    run, root = tmp_path / "run", tmp_path / "data"
    args = [DEMO, *tiny, f"data.root={root}", f"run.dir={run}"]
    mask = os.umask(0o027)  # not the usual 022: the mode must come from the umask, not from a constant
    try:
        assert train_fold.main(args) == 0
        assert test_fold.main([*args, "--checkpoint", str(run / "best.safetensors"), "--out", str(run / "r.json")]) == 0
    finally:
        os.umask(mask)
    files = [p for folder in (run, root) for p in folder.rglob("*") if p.is_file()]
    assert {"best.safetensors", "last.pt", "metrics.jsonl", "config.yaml", "r.json"} <= {p.name for p in files}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o640" for p in files}


def _final_rows(run: Path) -> list[dict]:
    """metrics.jsonl without its timing field."""
    return [{k: v for k, v in r.items() if k != "episodes_per_s"} for r in read_jsonl(run / "metrics.jsonl")]


def test_resume_restores_the_rng_of_a_dropout_head(tiny, tmp_path):
    # dropout draws from the global torch RNG at every step: without the RNG state of last.pt a resumed run drops
    # other units than an uninterrupted one
    args = [DEMO, *tiny, "model.head=transformer", "model.transformer.dropout=0.1", "optim.schedule=constant"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train_fold.main([*args, f"run.dir={full}"]) == 0
    assert train_fold.main([*args, f"run.dir={cut}", "train.max_iters=2"]) == 0
    assert train_fold.main([*args, f"run.dir={cut}", "--resume"]) == 0
    resumed, uninterrupted = _final_weights(cut), _final_weights(full)
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert _final_rows(cut) == _final_rows(full)


# Fault injection in a process of its own: the tool's main, after `INJECT` code that sets the fault up.
DROPOUT_RUN = [
    "model.head=transformer",
    "model.transformer.dropout=0.1",
    "train.max_iters=12",
    "train.val_every=4",
    "train.checkpoint_every=4",
]


def _spawn(args: list[str], inject: str) -> subprocess.Popen:
    code = (
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\n{inject}\nfrom tools import train_fold\n"
        "sys.exit(train_fold.main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory) -> Path:
    """A run of DROPOUT_RUN from start to end, to compare interrupted runs with."""
    run = tmp_path_factory.mktemp("uninterrupted")
    assert train_fold.main([DEMO, *tiny, *DROPOUT_RUN, f"run.dir={run}"]) == 0
    return run


def _assert_same_run(run: Path, uninterrupted: Path) -> None:
    resumed, expected = _final_weights(run), _final_weights(uninterrupted)
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key
    assert _final_rows(run) == _final_rows(uninterrupted)  # each row once, with the same values
    assert not [p.name for p in run.iterdir() if TEMPORARY.fullmatch(p.name)]


# Makes each step last 0.2 s, so that the signal comes mid-run on a loaded machine too.
SLOW_STEPS = """
import time
import fewshot.trainer
_to_device = fewshot.trainer.to_device
def to_device(*args):
    time.sleep(0.2)
    return _to_device(*args)
fewshot.trainer.to_device = to_device
"""


@pytest.mark.integration
def test_sigterm_saves_an_exact_state_to_resume(tiny, tmp_path, uninterrupted):
    run = tmp_path / "run"
    args = [DEMO, *tiny, *DROPOUT_RUN, f"run.dir={run}"]
    proc = _spawn(args, SLOW_STEPS)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and any(r.get("step", 0) >= 5 for r in read_jsonl(run / "metrics.jsonl")):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # past the periodic checkpoint of step 4
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped_at = torch.load(run / "last.pt", weights_only=False)["step"]
    assert 5 <= stopped_at < 12, "the run finished before it could be stopped"
    assert f"stopped by SIGTERM at step {stopped_at}" in err and "--resume" in err

    assert train_fold.main([*args, "--resume"]) == 0
    _assert_same_run(run, uninterrupted)


# Kills the process halfway through writing the checkpoint of step 8 (torch.save into the atomic temporary).
KILL_IN_CHECKPOINT_WRITE = """
import io, os, signal, torch
_save = torch.save
def save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("step") == 8:
        buffer = io.BytesIO()
        _save(obj, buffer, *args, **kwargs)
        out = f if hasattr(f, "write") else open(f, "wb")
        out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        out.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *args, **kwargs)
torch.save = save
"""


@pytest.mark.integration
def test_resume_after_a_kill_during_a_checkpoint_write(tiny, tmp_path, uninterrupted):
    run = tmp_path / "run"
    args = [DEMO, *tiny, *DROPOUT_RUN, f"run.dir={run}"]
    proc = _spawn(args, KILL_IN_CHECKPOINT_WRITE)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert [p.name for p in run.iterdir() if TEMPORARY.fullmatch(p.name)], "no temporary left: not killed mid-write"
    assert torch.load(run / "last.pt", weights_only=False)["step"] == 4
    assert max(r["step"] for r in read_jsonl(run / "metrics.jsonl")) == 8  # steps 5 to 8 are replayed

    assert train_fold.main([*args, "--resume"]) == 0
    _assert_same_run(run, uninterrupted)
