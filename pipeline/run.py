"""The pipeline: one recipe, stages chained through files, in rounds.

    python -m pipeline.run recipes/default.yaml                 # every stage of every round (make pipeline)
    python -m pipeline.run recipes/default.yaml rounds=2        # key=value overrides
    python -m pipeline.run recipes/default.yaml --stage sft     # one stage (make sft)
    python -m pipeline.run recipes/default.yaml --stage dpo --round 2

Stages and the files between them (runs/<name>/<stage>/ for round 1, runs/<name>/round<r>/<stage>/ after):

    prepare   data/*.jsonl, tokenizer, base model      (the embedded task, or the recipe's files/model)
    sft       model/                                   <- base model + SFT data (round r: previous policy + best-of-K)
    reward    model/                                   <- the round's starting policy + preference data
    sample    best_of_k.jsonl, pairs.jsonl             <- the round's starting policy + reward model + prompts
    dpo       model/                                   <- the round's SFT model + pairs (or preference data)
    eval      report/metrics.json, report/index.html   <- every stage of every round

Policies (prepare's base, sft, dpo) also write eval_responses.jsonl: their sampled answers to the held-out
prompts, which the eval stage judges. A stage whose manifest matches its config and input hashes is
skipped; a changed input reruns it and, since its outputs change, the stages after it. A stage refuses an
input from a stage that did not finish or whose files changed since it did (rerun that one), and a second
run into a stage folder that a live run holds (its .lock).

Exit codes: 0 done; 2 bad input or config (one `error:` line); 3 a training stage's loss or gradient norm went
NaN/Inf (one `error:` line naming stage, step and value; no model written, the last good checkpoint kept);
130/143 interrupted by SIGINT/SIGTERM (a training stage checkpoints first: rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from contextlib import nullcontext
from pathlib import Path

from alignment import dpo, sft
from core.checkpoints import NonFiniteError
from core.config import ConfigError, load_recipe
from core.tracking import quiet_library_bars
from core.runs import StageBusy, StageRun, TemplateMismatch, UpstreamError, stage_dir, stage_lock
from data import doctor, hub
from data.chat_format import ChatFormatError, load_tokenizer
from data.formats import DataError
from data.io import read_json
from evals import dashboard, report
from pipeline import prepare
from reward import train as reward
from sampling import sample

# stage -> its entry point, main(recipe, out_dir, inputs) -> metrics
STAGES = {"prepare": prepare.main, "sft": sft.main, "reward": reward.main, "sample": sample.main, "dpo": dpo.main,
          "eval": report.main}


def schedule(recipe) -> list[tuple[int, str]]:
    """(round, stage) in the order they run.

    Round 1: prepare -> sft (on the SFT data) -> reward -> sample (with the SFT policy) -> dpo.
    Round r >= 2 starts from round r-1's DPO policy: reward (initialised from it) -> sample (with it) ->
    sft (it, fine-tuned on this round's best-of-K answers) -> dpo (from that SFT model, on this round's pairs).
    Then one eval stage over every round."""
    steps = [(1, s) for s in ("prepare", "sft", "reward", "sample", "dpo")]
    for r in range(2, recipe.rounds + 1):
        steps += [(r, s) for s in ("reward", "sample", "sft", "dpo")]
    return steps + [(recipe.rounds, "eval")]


def stage_inputs(recipe, stage: str, round_idx: int = 1) -> dict:
    """The files a stage of round `round_idx` reads, by name."""
    r = round_idx
    prep = stage_dir(recipe, "prepare")
    t = recipe.task
    data = (lambda name, override: Path(override) if override and not hub.is_hub(override) else prep / "data" / f"{name}.jsonl")
    base = Path(recipe.model.name_or_path) if not (recipe.model.name_or_path == "tiny" or hub.is_hub(recipe.model.name_or_path)) else prep / "model"
    policy = stage_dir(recipe, "sft") / "model" if r == 1 else stage_dir(recipe, "dpo", r - 1) / "model"  # the round's start
    eval_prompts = data("eval_prompts", t.eval_prompts_data)
    if stage == "sft":
        if r == 1:
            return {"model": base, "data": data("sft", t.sft_data), "eval_prompts": eval_prompts}
        return {"model": policy, "data": stage_dir(recipe, "sample", r) / "best_of_k.jsonl", "eval_prompts": eval_prompts}
    if stage == "reward":
        init = {"sft": policy, "base": base}.get(recipe.reward.init, Path(recipe.reward.init))
        return {"model": init, "data": data("preference", t.preference_data),
                "eval_data": data("eval_preference", t.eval_preference_data)}
    if stage == "sample":
        return {"policy": policy, "reward": stage_dir(recipe, "reward", r) / "model", "prompts": data("prompts", t.prompts_data),
                "eval_prompts": eval_prompts}  # never sampled: their best answers would be trained on
    if stage == "dpo":
        pairs = {"sampling": stage_dir(recipe, "sample", r) / "pairs.jsonl", "preference": data("preference", t.preference_data)}
        return {"model": stage_dir(recipe, "sft", r) / "model", "data": pairs.get(recipe.dpo.data, Path(recipe.dpo.data)),
                "eval_prompts": eval_prompts}
    if stage == "eval":  # every stage folder up to round r
        dirs = {"prepare": prep} if (prep / "metrics.json").exists() else {}
        for rr, s in schedule(recipe):
            if s not in ("prepare", "eval") and rr <= r:
                dirs[f"r{rr}/{s}"] = stage_dir(recipe, s, rr)
        return dirs
    return {}


def round_recipe(recipe, round_idx: int):
    """The recipe a stage of round `round_idx` runs with: rounds after the first sample with other seeds."""
    if round_idx <= 1:
        return recipe
    out = copy.deepcopy(recipe)
    out.sampling.seed = recipe.sampling.seed + 1000 * (round_idx - 1)
    return out


def stage_config(recipe, stage: str, round_idx: int = 1) -> dict:
    r = round_recipe(recipe, round_idx).to_dict()
    keys = {"prepare": ["task", "model", "eval"], "sft": ["model", "sft", "eval"], "reward": ["model", "reward"],
            "sample": ["model", "sampling"], "dpo": ["model", "dpo", "eval"], "eval": ["model", "reward", "eval"]}[stage]
    return {"seed": recipe.seed, "round": round_idx, **{k: r[k] for k in keys}}


def template_hash(model_dir: Path, model_cfg=None) -> str | None:
    """The tokenizer + chat template hash of a model folder (None if it has no tokenizer yet), with the
    recipe's model.chat_template / template_date when given (as the stages encode)."""
    if not (Path(model_dir) / "tokenizer.json").exists():
        return None
    if model_cfg is None:
        return load_tokenizer(model_dir).template_hash()
    return load_tokenizer(model_dir, model_cfg.chat_template, model_cfg.template_date).template_hash()


TRAINING = ("sft", "reward", "dpo")  # every process of `accelerate launch` runs these; the others run once


def run_stage(recipe, stage: str, round_idx: int = 1, force: bool = False, *, _main_only: bool = False) -> dict | None:
    if not _main_only and int(os.environ.get("WORLD_SIZE", "1")) > 1 and stage not in TRAINING:
        from accelerate import PartialState  # under a launcher: process 0 runs the stage, the others wait for it

        with PartialState().main_process_first():
            return run_stage(recipe, stage, round_idx, force, _main_only=True) if PartialState().is_main_process else None
    out = stage_dir(recipe, "report") if stage == "eval" else stage_dir(recipe, stage, round_idx)
    label = stage if round_idx == 1 or stage in ("prepare", "eval") else f"round {round_idx} {stage}"
    inputs = {k: v for k, v in stage_inputs(recipe, stage, round_idx).items() if v is not None}
    model_dir = inputs.get("model") or inputs.get("policy")
    # refuses inputs from a stage of this run that did not finish or changed since (UpstreamError)
    run = StageRun(out, stage, stage_config(recipe, stage, round_idx), inputs, template_hash(model_dir, recipe.model) if model_dir else None,
                   run_dir=Path(recipe.output_dir) / recipe.name)
    for path in inputs.values():  # refuse inputs made with another tokenizer or chat template
        run.check_template(Path(path) if stage == "eval" else Path(path).parent)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under a launcher every rank of a training stage is here
    with stage_lock(out) if main_process else nullcontext():  # one run per stage folder (StageBusy)
        if not force and run.is_up_to_date():
            print(f"[{label}] up to date: {out}")
            return None
        # the doctor on the model the stage starts from: an error stops it here (DoctorError), warnings print
        doctor.before_stage(round_recipe(recipe, round_idx), stage, inputs, show=main_process)
        print(f"[{label}] running -> {out}", flush=True)
        if main_process:
            run.start()
        metrics = STAGES[stage](round_recipe(recipe, round_idx), out, inputs)
        extra = {"template_hash": template_hash(out / "model", recipe.model)} if stage == "prepare" else {}
        if not main_process:  # under a launcher the main process alone writes metrics + manifest
            return metrics
        metrics = run.finish(metrics, extra)
    summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print(f"[{label}] done in {metrics['wall_seconds']}s: " + ", ".join(f"{k}={v}" for k, v in list(summary.items())[:8]))
    return metrics


HEADLINE = ("gold_score", "pass_rate", "rm_accuracy", "best_of_k_gold_score", "random_of_k_gold_score",
            "win_rate_vs_sft_rm", "win_rate_vs_sft_gold", "kl_to_reference", "reward_length_corr")


def print_report(recipe) -> None:
    path = stage_dir(recipe, "report") / "metrics.json"
    rep = read_json(path)
    for rnd in rep["rounds"]:
        print(f"round {rnd['round']}:")
        for s, m in rnd["stages"].items():
            print(f"  {s:9s} " + ", ".join(f"{k}={m[k]}" for k in HEADLINE if m.get(k) is not None))
    page = path.parent / "index.html"
    print(f"report: {path}" + (f"\ndashboard: {page}  (make dashboard serves it)" if page.exists() else ""))


def build_dashboard(recipe) -> None:
    dashboard.build(stage_dir(recipe, "report").parent)
    dashboard.build_index(Path(recipe.output_dir))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", nargs="?", default="recipes/default.yaml")
    ap.add_argument("--stage", choices=list(STAGES) + ["report"], help="run this stage only")
    ap.add_argument("--round", type=int, default=1, help="with --stage: the round (default 1)")
    ap.add_argument("--force", action="store_true", help="rerun even if up to date")
    ap.add_argument("--schedule", action="store_true", help="print the (round, stage) order and exit (the Makefile's "
                    "launcher path runs it stage by stage)")
    ap.add_argument("overrides", nargs="*", help="key=value")
    args = ap.parse_intermixed_args(argv)
    quiet_library_bars()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.schedule:
            print("\n".join(f"{r} {s}" for r, s in schedule(recipe)))
            return 0
        if args.stage:
            stage = "eval" if args.stage == "report" else args.stage
            round_idx = recipe.rounds if stage == "eval" else args.round
            if (round_idx, stage) not in schedule(recipe):
                raise ConfigError(f"{recipe.source}: round {args.round} has no {stage} stage (rounds: {recipe.rounds}; "
                                  "round 1: prepare sft reward sample dpo, later rounds: reward sample sft dpo)")
            todo = [(round_idx, stage)]
        else:
            todo = schedule(recipe)
        for round_idx, stage in todo:
            run_stage(recipe, stage, round_idx, force=args.force and bool(args.stage))
            if stage == "eval" and int(os.environ.get("RANK", "0")) == 0:  # the other ranks waited for it
                build_dashboard(recipe)
                print_report(recipe)
    except (ConfigError, DataError, ChatFormatError, TemplateMismatch, UpstreamError, StageBusy, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # a diverged run: not bad input, and its checkpoints are worth keeping
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
