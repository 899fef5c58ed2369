"""Atomic file writes: a reader never sees a half-written result or checkpoint.

A write goes to a temporary file beside its target, `.NAME.PID.XXXXXXXX.tmp`, renamed over `NAME` once complete. A
process killed mid-write (kill -9, out of memory, power loss) leaves its temporary behind; `remove_stale_temporaries`
clears those of a folder whose writer is gone.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

# .last.pt.4711.3f9a0c21.tmp; without the pid (and with mkstemp's alphabet), those of writes before the pid was added
TEMPORARY = re.compile(r"\.(?P<target>.+?)\.(?:(?P<pid>\d+)\.)?[a-z0-9_]{8}\.tmp")


def _create_temporary(path: Path) -> tuple[Path, int]:
    """An empty new temporary file beside `path`, and the mode it got: that of any new file here (0666 less the
    umask), where mkstemp gives 0600. The name is drawn from os.urandom, never from the `random` module: a write must
    not move the RNG state that an exact resume restores."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        mode = os.fstat(fd).st_mode & 0o777
        os.close(fd)
        return tmp, mode
    raise FileExistsError(f"no free temporary name beside {path}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is fsynced and renamed over `path`, else removed.

    The file renamed over `path` gets the mode of a new file here, whoever wrote it: some writers replace the
    temporary with a file of their own (safetensors' `save_file` writes a 0600 file and renames it into place).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _create_temporary(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(folder: str | Path) -> list[str]:
    """Deletes the temporaries of writes into `folder` cut off by the death of their process; returns their names.

    Only files named as `atomic_path` names them are touched, and only when the process that made them is gone: call
    it before this process writes into `folder` (a pid recycled by a live process keeps its file until a later call).
    """
    removed = []
    for path in sorted(Path(folder).iterdir()):
        match = TEMPORARY.fullmatch(path.name)
        if match is None or not path.is_file() or _alive(match["pid"]):
            continue
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def _alive(pid: str | None) -> bool:
    if pid is None or int(pid) == os.getpid():  # no pid (older writes), or ours before we wrote anything here
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # alive, under another user
        return True
    return True


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Calls `write(file)` on a temporary file and renames it over `path` once complete."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Appends one JSON line; a line is written with a single `write` call so a crash cannot split it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
