"""Hugging Face Hub inputs made local, once, by the prepare stage.

A recipe may name a hub model (`model.name_or_path: meta-llama/Llama-3.1-8B-Instruct`) and hub datasets
(`task.sft_data: HuggingFaceH4/ultrafeedback_binarized:train_sft`, a split slice such as `:test_gen[:500]`
included). The prepare stage downloads them into runs/<name>/prepare/ (`model/`: safetensors, config and
tokenizer only; `data/<name>.jsonl`), so every later stage reads local files whose hashes go into its
manifest, and the network is needed once. Prompt sets are written as `{"id", "prompt": [messages]}` (the
sampling stage's format; a record's `prompt_id` or `id` kept, else `<split>-<row>`); the other sets as the
hub rows, which the stages' loaders normalise and validate (data/formats.py, data/validate.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from data.io import write_jsonl
from data.formats import DataError, _looks_local, iter_file, normalize_prompt

# task field -> the file name the prepare stage writes (and stage_inputs reads)
DATA_FIELDS = {"sft_data": "sft", "preference_data": "preference", "eval_preference_data": "eval_preference",
               "prompts_data": "prompts", "eval_prompts_data": "eval_prompts"}
PROMPT_SETS = ("prompts", "eval_prompts")
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]  # no .bin / .pth / original/ weights


def is_hub(spec: str | None) -> bool:
    """A Hugging Face name (`org/name`, `org/name:split`) rather than a local file or folder."""
    return bool(spec) and spec != "tiny" and not Path(spec).exists() and not _looks_local(spec)


def fetch_model(repo: str, out_dir: Path) -> None:
    """Download a hub model's safetensors, config and tokenizer into `out_dir` (atomic: temp dir, then rename)."""
    try:
        from huggingface_hub import snapshot_download

        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        snapshot_download(repo_id=repo, local_dir=str(tmp), allow_patterns=MODEL_FILES)
    except Exception as e:  # one line, not the client's traceback (gated model, no network, no token...)
        raise DataError(f"model.name_or_path {repo}: not a local folder, and cannot download it from the "
                        f"Hugging Face Hub: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not list(tmp.glob("*.safetensors")):
        raise DataError(f"model.name_or_path {repo}: no safetensors weights on the Hub (only safetensors are loaded)")
    shutil.rmtree(tmp / ".cache", ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def fetch_dataset(spec: str, out_path: Path, name: str) -> int:
    """Write a hub dataset (split) as JSONL at `out_path`; returns the rows written."""
    split = spec.partition(":")[2] or "train"
    rows, seen = [], set()
    for line, rec in iter_file(spec):
        if isinstance(rec, str):
            continue
        if name in PROMPT_SETS:
            rid = str(rec.get("prompt_id") or rec.get("id") or f"{split}-{line}")
            if rid in seen:  # a prompt repeated in the split: sampled once
                continue
            seen.add(rid)
            try:
                rec = normalize_prompt(rec, default_id=rid)
            except DataError:
                continue  # not a prompt; the validators would drop it too
            rec["id"] = rid
        rows.append(json.loads(json.dumps(rec, default=str)))
    if not rows:
        raise DataError(f"{spec}: no records")
    return write_jsonl(out_path, rows)


def fetch_task(task, data_dir: Path) -> dict[str, Path]:
    """Every hub-named data field of the recipe's task, downloaded: {file name: local path}."""
    out = {}
    for fld, name in DATA_FIELDS.items():
        spec = getattr(task, fld)
        if is_hub(spec):
            out[name] = data_dir / f"{name}.jsonl"
            n = fetch_dataset(spec, out[name], name)
            print(f"prepare: {spec} -> {out[name]} ({n} rows)", flush=True)
    return out
