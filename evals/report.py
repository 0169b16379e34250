"""The eval stage: every round's figures in one file, `runs/<name>/report/metrics.json`.

    python -m pipeline.run recipes/default.yaml --stage eval          (make eval)

It reads each stage's metrics.json and the policies' `eval_responses.jsonl` (sampled answers to the held-out
prompts), and adds what needs several stages at once, judged by the final round's reward model:

    mean_reward            mean reward of a policy's responses
    reward_length_corr     Pearson correlation of reward with response length (a reward-hacking signal)
    win_rate_vs_sft_rm     P(policy's response beats the SFT policy's on the same prompt), by reward; ties 1/2
    win_rate_vs_sft_gold   the same by the gold judge (default task)
    kl_to_sft              KL(policy || SFT policy) per response, estimated on the policy's own samples:
                           mean over responses y ~ policy of  sum_t [log p(y_t) - log p_sft(y_t)]
    kl_to_reference        the same against the DPO stage's reference (its round's SFT model)

The KL estimate is unbiased when the responses were sampled at temperature 1 (eval.temperature, the default).
The SFT policy is round 1's; the reward model is the last round's, so every policy meets the same judge.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import torch

from core.logps import completion_logps
from core.models import load_causal_lm
from data.chat_format import load_tokenizer, pad_batch
from reward.model import load_reward_model, score_sequences

from core.evaluate import pearson
from core.tracking import progress

POLICIES = ("prepare", "sft", "dpo")  # stages whose folder holds a policy with eval responses


def win_rate(mine: dict, theirs: dict) -> float | None:
    """Share of shared keys where mine > theirs; a tie counts 1/2. mine/theirs: key -> score."""
    keys = [k for k in mine if k in theirs and mine[k] is not None and theirs[k] is not None]
    if not keys:
        return None
    return round(sum(1.0 if mine[k] > theirs[k] else 0.5 if mine[k] == theirs[k] else 0.0 for k in keys) / len(keys), 4)


@torch.no_grad()
def response_logps(model, fmt, responses: list[dict], batch_size: int = 32) -> list[float]:
    """Summed float32 log-probability of each response's completion ids given its prompt."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(responses), batch_size):
        chunk = responses[i : i + batch_size]
        encs = [fmt.encode_completion(r["prompt"], r["completion_ids"]) for r in chunk]
        ids = torch.tensor(pad_batch([e.input_ids for e in encs], fmt.pad_id), device=device)  # [B, T]
        attn = torch.tensor(pad_batch([[1] * len(e) for e in encs], 0), device=device)  # [B, T]
        mask = torch.tensor(pad_batch([[0] * e.prompt_len + [1] * (len(e) - e.prompt_len) for e in encs], 0),
                            device=device)  # [B, T]: completion tokens
        out += completion_logps(model, ids, attn, [mask])[0].tolist()
    return out


def read_responses(stage_dir: Path) -> list[dict] | None:
    p = stage_dir / "eval_responses.jsonl"
    if not p.exists():
        return None
    with open(p) as f:
        return [json.loads(line) for line in f if line.strip()]


def stage_figures(stage_dir: Path, run_dir: Path) -> dict:
    m = json.loads((stage_dir / "metrics.json").read_text()) if (stage_dir / "metrics.json").exists() else {}
    m = {k: v for k, v in m.items() if k != "samples"}
    return {**m, "dir": str(stage_dir.relative_to(run_dir))}


def main(recipe, out_dir: Path, inputs: dict) -> dict:
    """inputs: "prepare" and "r<round>/<stage>" -> stage folders (stage: sft, reward, sample, dpo), and
    optionally "eval_prompts". Returns the report (the pipeline writes it as report/metrics.json)."""
    run_dir = Path(out_dir).parent
    dirs = {k: Path(v) for k, v in inputs.items() if k != "eval_prompts"}
    n_rounds = max(int(m.group(1)) for k in dirs if (m := re.match(r"r(\d+)/", k)))
    figures = {k: stage_figures(d, run_dir) for k, d in dirs.items()}

    # -- every policy's eval responses, scored by the last round's reward model ---------------------------
    rm_dir = dirs[f"r{n_rounds}/reward"] / "model"
    fmt = load_tokenizer(rm_dir, recipe.model.chat_template, recipe.model.template_date)
    responses = {k: r for k, d in dirs.items() if k.split("/")[-1] in POLICIES and (r := read_responses(d))}
    t0 = time.perf_counter()
    rm = load_reward_model(rm_dir, recipe.model.dtype)
    rewards = {}
    for key, resp in progress(responses.items(), desc="eval: reward model", unit="policy", leave=False):
        encs = [fmt.encode_completion(r["prompt"], r["completion_ids"]) for r in resp]
        rewards[key] = score_sequences(rm, fmt, encs, recipe.reward.eval_batch_size)
    del rm

    def keyed(key, values):  # (prompt id, sample index) -> value
        return {(r["id"], r["sample"]): v for r, v in zip(responses[key], values)}

    sft_key = "r1/sft"
    for key, resp in responses.items():
        f = figures[key]
        lengths = [len(r["completion_ids"]) - int(r["stopped"]) for r in resp]
        f["mean_reward"] = round(sum(rewards[key]) / len(resp), 4)
        f["reward_length_corr"] = pearson(rewards[key], [float(n) for n in lengths])
        if key != sft_key and sft_key in responses:
            f["win_rate_vs_sft_rm"] = win_rate(keyed(key, rewards[key]), keyed(sft_key, rewards[sft_key]))
            f["win_rate_vs_sft_gold"] = win_rate(keyed(key, [r.get("gold") for r in resp]),
                                                 keyed(sft_key, [r.get("gold") for r in responses[sft_key]]))

    # -- KL to the SFT policy and to each DPO stage's reference, on the policy's own samples ---------------
    def logps_of(model_key, resp_key):
        model = load_causal_lm(dirs[model_key] / "model", "float32")
        return response_logps(model, fmt, responses[resp_key], recipe.eval.batch_size)

    for key in progress([k for k in responses if k not in ("prepare", sft_key)], desc="eval: KL", unit="policy", leave=False):
        own = logps_of(key, key)
        refs = {"kl_to_sft": sft_key, **({"kl_to_reference": key.replace("/dpo", "/sft")} if key.endswith("/dpo") else {})}
        cache: dict[str, list[float]] = {}
        for name, ref_key in refs.items():
            if ref_key in dirs:
                ref = cache[ref_key] = cache.get(ref_key) or logps_of(ref_key, key)
                figures[key][name] = round(sum(a - b for a, b in zip(own, ref)) / len(ref), 4)
    judge_seconds = round(time.perf_counter() - t0, 2)

    # -- the report ------------------------------------------------------------------------------------------
    names = {"sample": "sampling"}
    rounds = []
    for r in range(1, n_rounds + 1):
        stages = {names.get(s, s): figures[f"r{r}/{s}"] for s in ("sft", "reward", "sample", "dpo") if f"r{r}/{s}" in figures}
        rounds.append({"round": r, "stages": stages})
    final = {**rounds[-1]["stages"]}
    if "prepare" in figures:
        final = {"prepare": figures["prepare"], **final}
    return {"schema": 1, "recipe": recipe.name, "source": recipe.source, "rounds_planned": recipe.rounds,
            "rounds_completed": n_rounds, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "judge": {"reward_model": str(rm_dir.relative_to(run_dir)), "sft_policy": figures.get(sft_key, {}).get("dir"),
                      "seconds": judge_seconds},
            "stages": final, "rounds": rounds}
