"""Atomic file writes and JSON reads: every file the pipeline writes goes through here.

A reader never sees half a file: writes go to a temp file beside the target, are fsynced, then renamed.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w"):
    """Write to a temp file beside `path`, fsync, then rename over it: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_temp_files(folder: str | os.PathLike) -> int:
    """Delete the temp files that `atomic_open` leaves in `folder` when its writer is killed (kill -9 skips the
    cleanup above); call it only while no live writer uses the folder. Returns how many were removed."""
    stale = list(Path(folder).glob(".*.tmp"))  # atomic_open's names: .<target name>.<random>.tmp
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def write_json(path, obj) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def write_jsonl(path, records) -> int:
    n = 0
    with atomic_open(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_json(path):
    with open(path) as f:
        return json.load(f)
