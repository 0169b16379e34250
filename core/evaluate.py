"""Evaluate a policy on held-out prompts with the default task's gold judge (data.default_task.judge).

    gold_score: mean judge score in [0, 1] over `samples_per_prompt` sampled responses per prompt
    pass_rate:  share of responses scored 1.0
    mean_length: mean response length in tokens (eot excluded)
    stop_rate:  share of responses that ended with <|eot_id|> (the model learned to stop)

Every response is also returned under "responses" (prompt id, sample index, completion ids, text, gold):
the stages write them to `eval_responses.jsonl`, where the eval stage scores them with the reward model
(win rates against the SFT policy, KL to the reference, reward-length correlation).

Sampling (temperature 1 by default) estimates the quality of the policy's whole distribution, which is what
alignment changes; greedy decoding would only show its mode.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from core.distributed import local_load
from core.models import load_causal_lm
from core.tracking import progress
from data.chat_format import ChatFormat, pad_batch
from data.default_task import judge
from data.io import write_jsonl
from data.validate import load_prompts


@torch.no_grad()
def generate(model, fmt: ChatFormat, prompts: list[list[dict]], max_new_tokens: int, temperature: float,
             batch_size: int, seed: int, n: int = 1) -> list[list[list[int]]]:
    """Sampled completions as token ids (eot kept when the model stopped), `n` per prompt."""
    model.eval()
    device = next(model.parameters()).device
    out: list[list[list[int]]] = []
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for i in progress(range(0, len(prompts), batch_size), desc="eval: generate", unit="batch", leave=False):
        chunk = [fmt.encode_prompt(p) for p in prompts[i : i + batch_size]]
        ids = torch.tensor(pad_batch(chunk, fmt.pad_id, side="left"), device=device)
        attn = torch.tensor(pad_batch([[1] * len(c) for c in chunk], 0, side="left"), device=device)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        res = model.generate(
            input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_p=1.0, top_k=0, num_return_sequences=n,
            eos_token_id=fmt.stop_ids, pad_token_id=fmt.pad_id,
        )
        res = res[:, ids.shape[1] :].tolist()
        for j in range(len(chunk)):
            comps = []
            for seq in res[j * n : (j + 1) * n]:
                cut = next((k for k, t in enumerate(seq) if t in fmt.stop_ids), None)
                comps.append(seq[: cut + 1] if cut is not None else [t for t in seq if t != fmt.pad_id])
            out.append(comps)
    return out


def evaluate_policy(model, fmt: ChatFormat, records: list[dict], cfg, seed: int = 0) -> dict:
    """Gold-judge figures of `model` on prompt records `{"prompt": [messages], "category"?}`."""
    prompts = [r["prompt"] for r in records]
    comps = generate(model, fmt, prompts, cfg.max_new_tokens, cfg.temperature, cfg.batch_size, seed, cfg.samples_per_prompt)
    scores, lengths, stops = [], [], []
    by_cat: dict[str, list[float]] = {}
    samples, responses = [], []
    for r, cs in zip(records, comps):
        for j, c in enumerate(cs):
            stopped = bool(c) and c[-1] in fmt.stop_ids
            text = fmt.decode(c[:-1] if stopped else c)
            s = judge(r["prompt"], text)  # None: a prompt the gold judge cannot score (recipes on real data)
            scores.append(s)
            lengths.append(len(c) - int(stopped))
            stops.append(stopped)
            if s is not None:
                by_cat.setdefault(r.get("category", "all"), []).append(s)
            responses.append({"id": str(r.get("id", len(responses))), "sample": j, "prompt": r["prompt"],
                              "completion_ids": c, "text": text, "gold": s, "stopped": stopped})
            if len(samples) < 12:
                samples.append({"prompt": r["prompt"][-1]["content"], "response": text, "gold": s})
    n = max(1, len(scores))
    judged = [s for s in scores if s is not None]
    return {
        "gold_score": round(sum(judged) / len(judged), 4) if judged else None,
        "pass_rate": round(sum(s == 1.0 for s in judged) / len(judged), 4) if judged else None,
        "mean_length": round(sum(lengths) / n, 2),
        "stop_rate": round(sum(stops) / n, 4),
        "gold_by_category": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_cat.items())},
        "n_responses": len(scores),
        "samples": samples,
        "responses": responses,
    }


def evaluate_saved_policy(accelerator, out_dir: Path, recipe, fmt, eval_prompts) -> dict:
    """A training stage's policy, as saved in out_dir/model (4-bit again with model.quantization nf4): its
    gold-judge figures on the eval prompts, and its answers in out_dir/eval_responses.jsonl (the eval stage
    scores them). Main process only; {} when there are no eval prompts. Every process may call it. The eval
    prompts' validation report goes into the figures (`eval_prompts_data`): a bad eval record is counted
    there, not lost."""
    if not (accelerator.is_main_process and eval_prompts):
        return {}
    prompts, report = load_prompts(eval_prompts)
    if report.n_rejected:
        for line in report.lines()[:20]:
            print(line, file=sys.stderr)
    with local_load(accelerator):  # this process alone: no ZeRO-3 sharding, no synced generation
        # nf4 (QLoRA): loaded 4-bit, as it trained: a 70B policy in bf16 (141 GB) would not fit beside the
        # stage's own sharded training state on the main process's GPU
        policy = load_causal_lm(out_dir / "model", recipe.model.dtype, quantization=recipe.model.quantization,
                                device=accelerator.device).to(accelerator.device)
        metrics = evaluate_policy(policy, fmt, prompts, recipe.eval, seed=recipe.seed)
    write_jsonl(out_dir / "eval_responses.jsonl", metrics.pop("responses"))
    return {**metrics, "eval_prompts_data": report.to_dict()}


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation; None when there are fewer than 3 points or a constant side."""
    n = len(xs)
    if n < 3 or n != len(ys):
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return round(sxy / math.sqrt(sxx * syy), 4)
