"""Rejection-sampling throughput: vLLM vs Hugging Face `generate`, same model, prompts, K and length.

    .venv/bin/python bench/sampling_vllm_vs_hf.py                      # tiny random model built here
    .venv/bin/python bench/sampling_vllm_vs_hf.py --model runs/default/sft/model --prompts 64 --k 8

Each engine runs in its own subprocess (vLLM's CPU thread/NUMA binding would otherwise slow the HF run):
load, one warm-up call, then one timed call over all prompts with K samples each (HF: left-padded batch,
`do_sample=True, num_return_sequences=K`; vLLM: token-id prompts, `SamplingParams(n=K)`). Both sample at
temperature 1, stop on <|eot_id|>/<|end_of_text|> and count the tokens actually generated (up to and
including the stop token). Both get the same number of CPU threads. Writes
bench/results/sampling-<date>-<machine>.json with the machine, package versions and date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.runs import package_versions, source  # noqa: E402


def prompt_ids(fmt, n: int) -> list[list[int]]:
    from data import default_task

    prompts = default_task.generate(seed=0, n_sft=10, n_preference=10, n_eval_preference=5, n_eval_prompts=5,
                                    n_sampling_prompts=n)["prompts"]
    return [fmt.encode_prompt(p["prompt"]) for p in prompts]


def run_hf(args, fmt, prompts) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from data.chat_format import pad_batch

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device).eval()
    start = time.perf_counter() - t0

    def gen(batch):
        ids = torch.tensor(pad_batch(batch, fmt.pad_id, side="left"), device=device)
        attn = (torch.arange(ids.shape[1], device=device)[None, :] >= torch.tensor([ids.shape[1] - len(b) for b in batch], device=device)[:, None]).long()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 num_return_sequences=args.k, max_new_tokens=args.max_tokens,
                                 eos_token_id=list(fmt.stop_ids), pad_token_id=fmt.pad_id)
        tokens = 0
        for row in out[:, ids.shape[1]:].tolist():
            n = next((i + 1 for i, t in enumerate(row) if t in fmt.stop_ids), len(row))
            tokens += n
        return len(out), tokens

    torch.manual_seed(0)
    gen(prompts[:1])  # warm-up
    t0 = time.perf_counter()
    cands, tokens = 0, 0
    for s in range(0, len(prompts), args.hf_batch):
        c, t = gen(prompts[s : s + args.hf_batch])
        cands, tokens = cands + c, tokens + t
    secs = time.perf_counter() - t0
    return {"engine": "hf", "start_seconds": round(start, 2), "seconds": round(secs, 3), "candidates": cands,
            "tokens": tokens, "threads": torch.get_num_threads(), "device": device, "batch_prompts": args.hf_batch}


def run_vllm(args, fmt, prompts) -> dict:
    import torch

    cpu = not torch.cuda.is_available()
    if cpu:  # the stage's CPU settings: in-process engine, eager; all `threads` cores for OMP
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(max(0, (os.cpu_count() or 1) - args.threads)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams

    kw = dict(model=args.model, tokenizer=args.model, seed=0, enable_prefix_caching=True, dtype=args.dtype,
              gpu_memory_utilization=0.3, max_model_len=max(len(p) for p in prompts) + args.max_tokens)
    if cpu:
        # no chunked prefill: vLLM-CPU crashes ("CPU Generator does not use offset") when a seeded request's
        # prefill is split over steps; the stage sets the same
        kw.update(enforce_eager=True, distributed_executor_backend="uni", enable_chunked_prefill=False,
                  max_num_batched_tokens=max(4096, kw["max_model_len"]))
    llm = LLM(**kw)
    start = time.perf_counter() - t0
    sp = SamplingParams(n=args.k, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens, seed=0, stop_token_ids=list(fmt.stop_ids))
    llm.generate([{"prompt_token_ids": prompts[0]}], sp, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    secs = time.perf_counter() - t0
    cands = [c for o in outs for c in o.outputs]
    return {"engine": "vllm", "start_seconds_incl_import": round(start, 2), "seconds": round(secs, 3), "candidates": len(cands),
            "tokens": sum(len(c.token_ids) for c in cands), "threads": torch.get_num_threads(),
            "device": "cpu" if cpu else "cuda", "stopped_share": round(sum(c.finish_reason == "stop" for c in cands) / len(cands), 3)}


def machine() -> tuple[str, dict]:
    info = {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
            return info["gpu"].replace(" ", "-") + f"-x{info['gpus']}", info
    except Exception:
        pass
    return f"cpu-{platform.machine()}-{os.cpu_count()}c", info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF causal LM folder with its tokenizer (default: a tiny random Llama built here)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--hf-batch", type=int, default=8, help="prompts per HF generate call (x K rows)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--engine", choices=["hf", "vllm"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    from data.chat_format import load_tokenizer

    if args.engine:  # child: one engine, JSON on the last stdout line
        fmt = load_tokenizer(args.model)
        res = (run_hf if args.engine == "hf" else run_vllm)(args, fmt, prompt_ids(fmt, args.prompts))
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    tmp = None
    if not args.model:
        from core.config import ModelConfig
        from data import default_task
        from data.tiny import make_model, train_tokenizer

        tmp = tempfile.mkdtemp(prefix="bench-tiny-")
        data = default_task.generate(seed=0, n_sft=500, n_preference=100, n_eval_preference=10, n_eval_prompts=10, n_sampling_prompts=10)
        make_model(train_tokenizer(default_task.corpus(data), tmp, 1024), tmp, ModelConfig())
        args.model = tmp
    results = {}
    for engine in ("hf", "vllm"):
        cmd = [sys.executable, __file__, "--engine", engine, "--model", args.model, "--prompts", str(args.prompts),
               "--k", str(args.k), "--max-tokens", str(args.max_tokens), "--dtype", args.dtype,
               "--threads", str(args.threads), "--hf-batch", str(args.hf_batch)]
        env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        line = next((x for x in reversed(p.stdout.splitlines()) if x.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            print(p.stdout[-3000:], p.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{engine} run failed (exit {p.returncode})")
        r = json.loads(line[len("RESULT "):])
        r["candidates_per_s"] = round(r["candidates"] / r["seconds"], 2)
        r["tokens_per_s"] = round(r["tokens"] / r["seconds"], 1)
        results[engine] = r
        print(f"{engine:5s} {r['candidates_per_s']:8.1f} candidates/s {r['tokens_per_s']:9.1f} tokens/s "
              f"({r['candidates']} candidates, {r['tokens']} tokens, {r['seconds']} s)", flush=True)

    name, info = machine()
    date = time.strftime("%Y-%m-%d")
    report = {
        "benchmark": "rejection sampling: vLLM vs HF generate",
        "date": date, "machine": name, "machine_info": info, "versions": package_versions(), "source": source(),
        "model": "tiny random Llama (data.tiny, hidden 128, 4 layers, vocab 1024)" if tmp else args.model,
        "settings": {"prompts": args.prompts, "k": args.k, "max_tokens": args.max_tokens, "dtype": args.dtype,
                     "temperature": 1.0, "threads": args.threads, "stop_ids": "eot, end_of_text"},
        "results": results,
        "speedup_candidates_per_s": round(results["vllm"]["candidates_per_s"] / results["hf"]["candidates_per_s"], 2),
        "speedup_tokens_per_s": round(results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"], 2),
    }
    out = Path(args.out) / f"sampling-{date}-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"vLLM / HF: {report['speedup_candidates_per_s']}x candidates/s, {report['speedup_tokens_per_s']}x tokens/s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
