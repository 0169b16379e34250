"""The pipeline: one recipe, stages chained through files.

    python -m alignment.pipeline recipes/default.yaml                 # every stage (make pipeline)
    python -m alignment.pipeline recipes/default.yaml --stage sft     # one stage (make sft)
    python -m alignment.pipeline recipes/default.yaml sft.lr=1e-4     # key=value overrides

Stages and the files between them (runs/<name>/<stage>/):

    prepare   data/*.jsonl, tokenizer, base model      (the embedded task, or the recipe's files/model)
    sft       model/                                   <- prepare's model + SFT data
    reward    model/                                   <- sft's model + preference data
    sample    best_of_k.jsonl, pairs.jsonl             <- sft's model + reward's model + prompts
    dpo       model/                                   <- sft's model + pairs (or preference data)
    report    metrics.json                             <- every stage's metrics.json

A stage whose manifest matches its config and input hashes is skipped; a changed input reruns it and,
since its outputs change, the stages after it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

from alignment.config import ConfigError, load_recipe
from alignment.runs import StageRun, TemplateMismatch, read_json, stage_dir, write_json, write_jsonl
from data.chat_format import ChatFormatError
from data.formats import DataError

STAGES = ("prepare", "sft", "reward", "sample", "dpo", "report")
MODULES = {"sft": "alignment.sft", "reward": "reward.train", "sample": "sampling.sample", "dpo": "alignment.dpo"}


def available(stage: str) -> bool:
    mod = MODULES.get(stage)
    return mod is None or importlib.util.find_spec(mod) is not None


# -- prepare: data, tokenizer and base model -------------------------------------------------------------
def prepare(recipe, out: Path) -> dict:
    """Write the task's data files and the starting model (with its tokenizer) into `out`."""
    task, mcfg = recipe.task, recipe.model
    data_dir = out / "data"
    files = {}
    if task.kind == "default":
        from data import default_task

        sets = default_task.generate(task.seed, task.n_sft, task.n_preference, task.n_eval_preference,
                                     task.n_eval_prompts, task.n_sampling_prompts)
        for name, recs in sets.items():
            files[name] = data_dir / f"{name}.jsonl"
            write_jsonl(files[name], recs)
    elif task.kind != "files":
        raise ConfigError(f"{recipe.source}: task.kind must be 'default' or 'files', got {task.kind!r}")
    metrics = {"data": {k: sum(1 for _ in open(v)) for k, v in files.items()}}
    model_dir = out / "model"
    if mcfg.name_or_path == "tiny":
        from data import default_task
        from data.tiny import make_model, train_tokenizer

        corpus = default_task.corpus(sets) if task.kind == "default" else []
        tmp = out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        fmt = train_tokenizer(corpus, tmp, mcfg.vocab_size)
        pretrain_texts = default_task.pretraining_text if task.kind == "default" else None
        model = make_model(fmt, tmp, mcfg, seed=recipe.seed, texts=pretrain_texts)
        if getattr(model, "pretrain_losses", None):
            metrics["pretrain_loss_first"] = round(model.pretrain_losses[0], 4)
            metrics["pretrain_loss_final"] = round(sum(model.pretrain_losses[-10:]) / 10, 4)
        shutil.rmtree(model_dir, ignore_errors=True)
        tmp.rename(model_dir)
        metrics["parameters"] = sum(p.numel() for p in model.parameters())
        if task.kind == "default":
            from evals.gold import evaluate_policy

            metrics.update(evaluate_policy(model, fmt, sets["eval_prompts"], recipe.eval, seed=recipe.seed))
    return metrics


def stage_inputs(recipe, stage: str) -> dict:
    """The files a stage reads, by name."""
    prep = stage_dir(recipe, "prepare")
    t = recipe.task
    data = (lambda name, override: Path(override) if override else prep / "data" / f"{name}.jsonl")
    base = Path(recipe.model.name_or_path) if recipe.model.name_or_path != "tiny" else prep / "model"
    sft_model = stage_dir(recipe, "sft") / "model"
    eval_prompts = data("eval_prompts", t.eval_prompts_data)
    if stage == "sft":
        return {"model": base, "data": data("sft", t.sft_data), "eval_prompts": eval_prompts}
    if stage == "reward":
        init = {"sft": sft_model, "base": base}.get(recipe.reward.init, Path(recipe.reward.init))
        return {"model": init, "data": data("preference", t.preference_data), "eval_data": data("eval_preference", t.eval_preference_data)}
    if stage == "sample":
        return {"policy": sft_model, "reward": stage_dir(recipe, "reward") / "model", "prompts": data("prompts", t.prompts_data)}
    if stage == "dpo":
        pairs = {"sampling": stage_dir(recipe, "sample") / "pairs.jsonl", "preference": data("preference", t.preference_data)}
        return {"model": sft_model, "data": pairs.get(recipe.dpo.data, Path(recipe.dpo.data)), "eval_prompts": eval_prompts}
    return {}


def stage_config(recipe, stage: str) -> dict:
    r = recipe.to_dict()
    keys = {"prepare": ["task", "model", "eval"], "sft": ["model", "sft", "eval"], "reward": ["model", "reward"],
            "sample": ["model", "sampling"], "dpo": ["model", "dpo", "eval"], "report": []}[stage]
    return {"seed": recipe.seed, **{k: r[k] for k in keys}}


def report(recipe) -> dict:
    """runs/<name>/report/metrics.json: `stages.<stage>` holds each stage's figures."""
    stages = {}
    for s in STAGES[:-1]:
        m = stage_dir(recipe, s) / "metrics.json"
        if m.exists():
            stages[{"sample": "sampling"}.get(s, s)] = {k: v for k, v in read_json(m).items() if k != "samples"}
    out = {"recipe": recipe.name, "stages": stages, "rounds": [stages]}
    write_json(stage_dir(recipe, "report") / "metrics.json", out)
    return out


def template_hash(model_dir: Path) -> str | None:
    """The tokenizer + chat template hash of a model folder (None if it has no tokenizer yet)."""
    if not (Path(model_dir) / "tokenizer.json").exists():
        return None
    from data.chat_format import load_tokenizer

    return load_tokenizer(model_dir).template_hash()


def run_stage(recipe, stage: str, force: bool = False) -> dict | None:
    out = stage_dir(recipe, stage)
    inputs = {k: v for k, v in stage_inputs(recipe, stage).items() if v is not None}
    model_dir = inputs.get("model") or inputs.get("policy")
    run = StageRun(out, stage, stage_config(recipe, stage), inputs, template_hash(model_dir) if model_dir else None)
    for path in inputs.values():  # refuse inputs made with another tokenizer or chat template
        run.check_template(Path(path).parent)
    if not force and run.is_up_to_date():
        print(f"[{stage}] up to date: {out}")
        return None
    print(f"[{stage}] running -> {out}", flush=True)
    if stage == "prepare":
        metrics = prepare(recipe, out)
        extra = {"template_hash": template_hash(out / "model")}
    else:
        metrics = importlib.import_module(MODULES[stage]).main(recipe, out, inputs)
        extra = {}
    metrics = run.finish(metrics, extra)
    summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print(f"[{stage}] done in {metrics['wall_seconds']}s: " + ", ".join(f"{k}={v}" for k, v in list(summary.items())[:8]))
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", nargs="?", default="recipes/default.yaml")
    ap.add_argument("--stage", choices=list(STAGES) + ["sample", "eval"], help="run this stage only")
    ap.add_argument("--force", action="store_true", help="rerun even if up to date")
    ap.add_argument("overrides", nargs="*", help="key=value")
    args = ap.parse_intermixed_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        todo = [args.stage if args.stage != "eval" else "report"] if args.stage else [s for s in STAGES if available(s)]
        skipped = [s for s in STAGES if not available(s)]
        if skipped and not args.stage:
            print(f"(stages not built yet, skipped: {', '.join(skipped)})")
        for stage in todo:
            if stage == "report":
                rep = report(recipe)
                path = stage_dir(recipe, "report") / "metrics.json"
                print(f"report: {path}")
                print(json.dumps({s: {k: v for k, v in m.items() if k in ("gold_score", "pass_rate", "rm_accuracy", "best_of_k_gold_score", "random_of_k_gold_score")} for s, m in rep["stages"].items()}, indent=1))
                continue
            run_stage(recipe, stage, force=args.force and bool(args.stage))
    except (ConfigError, DataError, ChatFormatError, TemplateMismatch, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
