"""Atomic writes: no torn file, the umask's mode whoever writes, and the temporaries a kill leaves behind."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest
from torch import nn

from fewshot.checkpoint import save_training_state, save_weights
from fewshot.config import load_config
from fewshot.io import TEMPORARY, atomic_path, atomic_write, remove_stale_temporaries, write_json


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"miou": 1.0})

    def explode(f):
        f.write(b"{half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(path, explode)
    assert path.read_text().startswith('{\n  "miou": 1.0')
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left behind


def test_atomic_files_get_ordinary_permissions(tmp_path):
    write_json(tmp_path / "r.json", {})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.fixture
def umask_027():
    """A umask other than the usual 022, so that a mode can only be right when it comes from the umask."""
    mask = os.umask(0o027)
    yield
    os.umask(mask)


def test_every_writer_leaves_the_umask_mode(tmp_path, umask_027):
    def replace_with_own_file(tmp: Path) -> None:  # as safetensors' save_file does: a 0600 file renamed over tmp
        fd, own = tempfile.mkstemp(dir=tmp.parent)
        os.write(fd, b"data")
        os.close(fd)
        os.replace(own, tmp)

    write_json(tmp_path / "r.json", {})
    atomic_write(tmp_path / "b.bin", lambda f: f.write(b"x"))
    with atomic_path(tmp_path / "own.bin") as tmp:
        replace_with_own_file(tmp)
    save_weights(tmp_path / "best.safetensors", nn.Linear(2, 2), load_config(None, []))
    save_training_state(tmp_path / "last.pt", {"step": 1})
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert modes == {name: "0o640" for name in ("r.json", "b.bin", "own.bin", "best.safetensors", "last.pt")}


def test_temporaries_are_named_for_their_target_and_writer_and_draw_no_random_numbers(tmp_path):
    state = random.getstate()
    with atomic_path(tmp_path / "last.pt") as tmp:
        match = TEMPORARY.fullmatch(tmp.name)
    assert match and match["target"] == "last.pt" and match["pid"] == str(os.getpid())
    assert random.getstate() == state  # a resume restores the RNG states of last.pt: writes must not move them


def test_only_temporaries_of_dead_writers_are_removed(tmp_path):
    pid_max = Path("/proc/sys/kernel/pid_max")
    gone = int(pid_max.read_text()) + 1 if pid_max.exists() else 2**22 + 1  # no process has this pid
    stale = [f".last.pt.{gone}.0a1b2c3d.tmp", ".best.safetensors.k3x9_0q2.tmp", f".last.pt.{os.getpid()}.00000000.tmp"]
    live = [f".metrics.jsonl.{os.getppid()}.0a1b2c3d.tmp"]  # the parent process is alive: its write may be under way
    other = ["last.pt", ".last.pt.tmp", "notes.tmp", ".last.pt.0a1b2c3.tmp", "last.pt.0a1b2c3d.tmp"]
    for name in stale + live + other:
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / ".tb.0a1b2c3d.tmp").mkdir()  # a folder is never a temporary of atomic_path
    assert remove_stale_temporaries(tmp_path) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(live + other + [".tb.0a1b2c3d.tmp"])
