"""One vLLM engine and the reward model that scores its candidates: what a sampling worker runs, whoever
runs it (a local worker process of sampling/sample.py, or a Ray actor of sampling/ray_backend.py).

Both backends generate and score a shard through `sample_shard` (or, with `sampling.score_after_generation`,
`generated_shard` for every shard and then `score_shard`), so candidates depend only on (prompt, seed, k,
sampling settings), not on which process or node made them, nor on when they were scored.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from core.config import SamplingConfig, section
from data.chat_format import load_tokenizer, tool_args
from reward.model import load_reward_model, score_sequences

ROOT = Path(__file__).resolve().parents[1]
SHARD_FMT = "shard-{:05d}.jsonl"
GEN_FMT = "gen-{:05d}.jsonl"  # score_after_generation: a shard generated, not yet scored


def normalize_completion(token_ids, finish_reason: str | None, eot_id: int, stop_ids, turn_end_ids=None,
                         stop_reason=None) -> tuple[list[int], bool]:
    """(completion ids, truncated). A stopped completion ends with exactly one turn end (`turn_end_ids`,
    ChatFormat.turn_end_ids: eot, and for llama3.1 eom, which a built-in tool call ends with and keeps: the
    next turn is the tool's ipython turn, not the user's). An <|end_of_text|> stop becomes eot; a stop token
    vLLM left out is put back (`stop_reason`, the id vLLM reports, when it is a turn end; eot otherwise).
    Any other finish is truncated."""
    ends = set(turn_end_ids or (eot_id,))
    ids = list(token_ids)
    if finish_reason != "stop":
        return ids, True
    if ids and ids[-1] in stop_ids:
        if ids[-1] not in ends:
            ids[-1] = eot_id
    else:
        ids.append(stop_reason if stop_reason in ends else eot_id)
    return ids, False


def score_candidates(model, fmt, prompts: list[list[dict]], completions: list[list[int]], batch_size: int,
                     tools: list[dict] | None = None) -> list[float]:
    """Reward of each (prompt messages, completion ids), from ids (`encode_completion`), never re-encoded text;
    `tools`: each prompt's tool_args (llama3.1 tool schemas / built-in tools)."""
    tools = tools or [{}] * len(prompts)
    encs = [fmt.encode_completion(p, c, **t) for p, c, t in zip(prompts, completions, tools)]
    return score_sequences(model, fmt, encs, batch_size)


def engine_kwargs(spec: dict) -> dict:
    """Arguments of `vllm.LLM` for a worker spec (one code path for CPU and GPU, CPU-only tweaks marked)."""
    cfg = section(SamplingConfig, spec["cfg"], "sampling")
    kw = dict(model=spec["policy"], tokenizer=spec["policy"], seed=cfg.seed, enable_prefix_caching=cfg.enable_prefix_caching,
              load_format="safetensors",  # as every other loader: never a pickle (vLLM's "auto" falls back to .bin)
              tensor_parallel_size=cfg.tensor_parallel, gpu_memory_utilization=cfg.gpu_memory_utilization,
              dtype=spec["dtype"], max_model_len=spec["max_model_len"])
    if cfg.enforce_eager:  # no torch.compile / CUDA graphs: a GPU engine starts sooner, generates slower
        kw["enforce_eager"] = True
    if cfg.max_num_seqs:
        kw["max_num_seqs"] = cfg.max_num_seqs
    graphs = cudagraph_batch(cfg)
    if graphs and not cfg.enforce_eager and not spec["cpu"]:  # the CPU engine is eager
        kw["compilation_config"] = {"max_cudagraph_capture_size": graphs}
    if cfg.enable_chunked_prefill is not None:
        kw["enable_chunked_prefill"] = cfg.enable_chunked_prefill
    if spec["cpu"]:
        kw.update(cpu_engine_kwargs(spec["max_model_len"], cfg.tensor_parallel))
    if cfg.tensor_parallel > 1:
        # the tensor-parallel workers are this process's children on the devices it sees, as on a plain host:
        # inside a Ray actor's placement group vLLM would otherwise pick its Ray executor and ask the cluster
        # for GPUs that the actor already holds
        kw["distributed_executor_backend"] = "mp"
    return kw


# vLLM's own limits (0.24, vllm/config/vllm.py and engine/arg_utils.py): CUDA graphs for batches up to
# min(2 x max_num_seqs, 512); max_num_seqs 1024 for vllm.LLM on a GPU of 70+ GB (256 on smaller ones)
VLLM_CUDAGRAPH_MAX = 512
VLLM_MAX_NUM_SEQS = 1024


def cudagraph_batch(cfg: SamplingConfig) -> int:
    """The largest batch an engine captures as a CUDA graph (0: vLLM's own choice), for sampling.cudagraph_max_batch.

    -1 (the default) covers the stage's decode batch: an engine generates one shard at a time, so it decodes at
    most shard_size x k sequences, and at most max_num_seqs of them at once (vLLM's 1024 when unset). Only a
    batch beyond vLLM's own 512 asks for more graphs; a smaller one leaves vLLM's choice, which also covers
    prefill steps of up to 512 tokens. On a GPU under 70 GB (vLLM's max_num_seqs 256 there) the graphs between
    256 and the shard's batch are captured and never used: seconds of start, no other cost."""
    if cfg.cudagraph_max_batch >= 0:
        return cfg.cudagraph_max_batch
    decode = min(cfg.shard_size * cfg.k, cfg.max_num_seqs or VLLM_MAX_NUM_SEQS)
    return decode if decode > VLLM_CUDAGRAPH_MAX else 0


def cpu_engine_kwargs(max_model_len: int, tensor_parallel: int = 1) -> dict:
    """What vLLM-CPU needs of `vllm.LLM` (the stage's engines and bench/sampling_speed.py's plain one)."""
    # torch.compile costs ~50 s per start on CPU; a 1-process engine starts in seconds. No chunked prefill:
    # vLLM-CPU crashes ("CPU Generator does not use offset") when a seeded request's prefill is split over
    # steps (it rewinds a CUDA-only generator offset).
    kw = dict(enforce_eager=True, enable_chunked_prefill=False, max_num_batched_tokens=max(4096, max_model_len))
    if tensor_parallel == 1:
        kw["distributed_executor_backend"] = "uni"
    return kw


def make_engine(spec: dict):
    from vllm import LLM

    return LLM(**engine_kwargs(spec))


def generate_shard(llm, entries: list[dict], cfg: SamplingConfig, fmt) -> tuple[list[dict], float, list[float]]:
    """(records with their candidates, seconds inside vLLM's generate, [start, end] of it in epoch seconds)."""
    from vllm import SamplingParams

    params = [SamplingParams(n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                             seed=e["seed"], stop_token_ids=list(fmt.stop_ids), detokenize=cfg.detokenize)
              for e in entries]  # the candidates' text is decoded here from their ids (fmt.decode), not by vLLM
    t0, wall0 = time.perf_counter(), time.time()
    outs = llm.generate([{"prompt_token_ids": e["prompt_ids"]} for e in entries], params, use_tqdm=False)
    gen_s, window = time.perf_counter() - t0, [round(wall0, 3), round(time.time(), 3)]
    recs = []
    for e, o in zip(entries, outs):
        sent = list(o.prompt_token_ids)
        if sent != e["prompt_ids"] or sent.count(fmt.bos_id) != 1:
            raise AssertionError(f"prompt {e['id']}: vLLM received other prompt ids than encoded (BOS x{sent.count(fmt.bos_id)})")
        cands = []
        for j, c in enumerate(sorted(o.outputs, key=lambda c: c.index)):
            ids, truncated = normalize_completion(c.token_ids, c.finish_reason, fmt.eot_id, fmt.stop_ids, fmt.turn_end_ids,
                                                  getattr(c, "stop_reason", None))
            cands.append({"k": j, "completion_ids": ids, "text": fmt.decode(ids), "finish_reason": c.finish_reason,
                          "truncated": truncated, "num_tokens": len(c.token_ids)})
        recs.append({**e, "candidates": cands})
    return recs, gen_s, window


def load_engines(spec: dict, phase: str = "both"):
    """(cfg, fmt, vLLM engine, reward model) of one worker spec: what a local worker process and a Ray actor
    (sampling/ray_backend.py) each hold. `phase` generate: no reward model (None); score: no engine (None)."""
    cfg = section(SamplingConfig, spec["cfg"], "sampling")
    fmt = load_tokenizer(spec["policy"], spec["chat_template"], spec["template_date"])
    t0 = time.perf_counter()
    llm = make_engine(spec) if phase != "score" else None
    t1 = time.perf_counter()
    rm = load_scorer(spec) if phase != "generate" else None
    print(f"[sampling worker {spec['rank']}] vLLM engine start {t1 - t0:.1f}s, reward model load "
          f"{time.perf_counter() - t1:.1f}s", file=sys.stderr, flush=True)
    return cfg, fmt, llm, rm


def load_scorer(spec: dict):
    """The reward model that scores a worker's candidates, loaded as its stage evaluated it: under
    model.quantization nf4 its body 4-bit again, quantized as it loads onto the worker's GPU (a 70B reward model
    takes ~37 GB so, 141 GB in bf16), else in the worker's dtype."""
    quantization = spec.get("reward_quantization", "none")
    device = None if spec["cpu"] else "cuda"
    rm = load_reward_model(spec["reward"], dtype=spec["reward_dtype"], quantization=quantization, device=device)
    return rm.to(device) if device is not None and quantization == "none" else rm


def sample_shard(llm, rm, idx: int, entries: list[dict], cfg: SamplingConfig, fmt) -> list[dict]:
    """One shard's records, generated and scored: the one code path for a shard, whoever runs it (a local worker,
    a Ray actor), so that candidates depend on the prompts and the recipe alone."""
    return score_shard(rm, generated_shard(llm, idx, entries, cfg, fmt), cfg, fmt)


def generated_shard(llm, idx: int, entries: list[dict], cfg: SamplingConfig, fmt) -> list[dict]:
    """One shard's records with their candidates, not scored yet."""
    recs, gen_s, window = generate_shard(llm, entries, cfg, fmt)
    for r in recs:  # per-shard timings, shared out so that sums over records survive resumes
        r["shard"], r["gen_seconds"] = idx, gen_s / len(recs)
        r["gen_window"] = window  # when this shard generated: engines that overlap (engines_per_gpu) are not summed
    return recs


def score_shard(rm, recs: list[dict], cfg: SamplingConfig, fmt) -> list[dict]:
    """A generated shard's records with every candidate's reward (in place), in one batching per shard: the
    same rewards whether the shard is scored right after it is generated or later (score_after_generation)."""
    t0 = time.perf_counter()
    flat = [(r["prompt"], c, tool_args(r)) for r in recs for c in r["candidates"]]
    scores = score_candidates(rm, fmt, [p for p, _, _ in flat], [c["completion_ids"] for _, c, _ in flat],
                              cfg.score_batch_size, [t for _, _, t in flat])
    for (_, c, _), s in zip(flat, scores):
        c["reward"] = s
    score_s = time.perf_counter() - t0
    for r in recs:
        r["score_seconds"] = score_s / len(recs)
    return recs


def engine_env(env: dict) -> dict:
    """`env` with what an engine's process needs (a local worker's, a Ray actor's): this checkout's modules first
    on the path, vLLM's logging at WARNING unless set, and vLLM's engine core in-process unless set.

    In-process, `LLM.generate` adds all of a shard's requests before the engine's first step, so its batches,
    and with them a GPU's numerics and the sampled ids, depend on the shard alone. With the engine core in a
    process of its own (vLLM's default on a GPU) the first steps take whichever requests have reached it, and
    the same shard gave other ids from run to run; in-process it gave the same ids in every run, on an H100 and
    an H200, with one engine or two sharing the GPU, at a rate within the runs' noise (README, "Rejection
    sampling on Ray"). On CPU, vLLM-CPU 0.32 also starts in seconds so (sampling/sample.py's module doc)."""
    env = dict(env)
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return env


def with_device(spec: dict, cpu: bool) -> dict:
    """The worker spec for engines on CPU or on GPUs: on CPU the reward model scores in float32."""
    return {**spec, "cpu": cpu, "reward_dtype": "float32" if cpu else spec["dtype"]}
