"""Stage 0: prepare. The task's data files and the starting model (with its tokenizer), in one folder.

    python -m pipeline.run recipes/default.yaml --stage prepare          (make prepare)

- task.kind `default`: the embedded task (data/default_task.py), generated from task.seed;
  `files`: the recipe's files, hub-named datasets downloaded once into data/ (data/hub.py).
- model `tiny`: a tokenizer trained on the task's texts and a tiny Llama-3-architecture model with its short
  plain-text pretraining (data/tiny.py); a hub name: its safetensors, config and tokenizer, downloaded once;
  a local folder: read in place by the later stages, checked here (config.json, safetensors weights).
- on the default task, the base model's gold-judge figures and its eval answers (eval_responses.jsonl).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from core.evaluate import evaluate_policy
from core.models import require_safetensors
from data import default_task, hub
from data.io import write_jsonl
from data.tiny import make_model, train_tokenizer


def main(recipe, out_dir: Path, inputs: dict | None = None) -> dict:
    """Write data/*.jsonl and model/ into `out_dir`; returns the stage's metrics."""
    task, mcfg = recipe.task, recipe.model
    # a local model folder: checked here, first, so that prepare does not report success for a missing one
    if mcfg.name_or_path != "tiny" and not hub.is_hub(mcfg.name_or_path):
        require_safetensors(mcfg.name_or_path, key=f"{recipe.source}: model.name_or_path")
    out = Path(out_dir)
    data_dir = out / "data"
    files, sets = {}, {}
    if task.kind == "default":
        sets = default_task.generate(task.seed, task.n_sft, task.n_preference, task.n_eval_preference,
                                     task.n_eval_prompts, task.n_sampling_prompts)
        for name, recs in sets.items():
            files[name] = data_dir / f"{name}.jsonl"
            write_jsonl(files[name], recs)
    else:  # files: hub-named datasets, downloaded once into data/ (data/hub.py)
        files.update(hub.fetch_task(task, data_dir))
    metrics = {"data": {k: sum(1 for _ in open(v)) for k, v in files.items()}}
    model_dir = out / "model"
    if hub.is_hub(mcfg.name_or_path):  # a hub model: its safetensors, config and tokenizer, once
        hub.fetch_model(mcfg.name_or_path, model_dir)
    if mcfg.name_or_path == "tiny":
        corpus = default_task.corpus(sets) if task.kind == "default" else []
        tmp = out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        fmt = train_tokenizer(corpus, tmp, mcfg.vocab_size, source=mcfg.tokenizer,  # or a copy of model.tokenizer
                              template=mcfg.chat_template, date=mcfg.template_date)
        pretrain_texts = default_task.pretraining_text if task.kind == "default" else None
        model = make_model(fmt, tmp, mcfg, seed=recipe.seed, texts=pretrain_texts)
        if getattr(model, "pretrain_losses", None):
            metrics["pretrain_loss_first"] = round(model.pretrain_losses[0], 4)
            metrics["pretrain_loss_final"] = round(sum(model.pretrain_losses[-10:]) / 10, 4)
        shutil.rmtree(model_dir, ignore_errors=True)
        tmp.rename(model_dir)
        metrics["parameters"] = sum(p.numel() for p in model.parameters())
        if task.kind == "default":
            metrics.update(evaluate_policy(model, fmt, sets["eval_prompts"], recipe.eval, seed=recipe.seed))
            write_jsonl(out / "eval_responses.jsonl", metrics.pop("responses"))
    return metrics
