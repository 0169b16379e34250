"""Stage 2: the reward model, trained on ranked preferences with the Bradley-Terry loss.

    python -m pipeline.run recipes/default.yaml --stage reward [reward.lr=1e-4 reward.one_row=false ...]
    accelerate launch --config_file recipes/accelerate/<launcher>.yaml -m pipeline.run RECIPE --stage reward

Setup -> loop -> save -> eval:
- model: the policy architecture with a scalar head (`reward.model.init_reward_model`), from the SFT model
  (recipe `reward.init: sft`), the base model, or a path; the head is new unless the path is a reward model.
- data: preference records, validated (bad records reported and skipped; training prompts that are also
  eval prompts rejected); every ordered pair of a row ranked edited > chosen > rejected is trained (3 pairs
  for 3 responses, 1 for 2). `max_length` bounds each prompt + response; a one-row sequence holds the
  prompt once plus all responses, and its position ids never exceed the longest prompt + response.
- layout: `one_row: true` (default, Llama 3) puts the prompt and its responses, shuffled, into one sequence
  with an exact 4D attention mask (see reward/model.py); `one_row: false` gives each response its own row.
- loss: -log sigmoid(r_better - r_worse [- margin]) summed over pairs and divided by the number of pairs
  of the whole optimizer step (all micro-batches and all processes), so gradient accumulation equals one
  big batch. No margin by default (Llama 3); `margin: true` adds Llama 2's (reward/loss.py says which).
- saves an HF reward model (safetensors, LoRA merged) in `model/`, which the sampling stage loads with
  `reward.model.load_reward_model` and scores with `reward.model.score_sequences`; with LoRA the adapters and
  the score head in `adapter/` too.
- eval (held-out preferences, separate rows, as sampling scores): `rm_accuracy` over all ordered pairs,
  by category and by pair type, reward-gap statistics, accuracy by |gap| bucket (calibration), and the
  per-pair rewards in `eval_rewards.json`.
"""

from __future__ import annotations

import random
import shutil
import statistics
from pathlib import Path

import torch

from core import checkpoints, distributed, models, optim, packing, tracking
from data.io import write_json
from data.chat_format import Encoded, load_tokenizer
from data.doctor import template_ids
from data.formats import ranked_pairs
from data.validate import load_preferences, prompt_keys
from data.formats import DataError
from reward.loss import bradley_terry_loss_sum, pair_margin
from reward.model import (RewardScorer, apply_lora, collate_one_row, collate_separate, hf_model, init_reward_model,
                          load_reward_model, model_dtype, score_sequences)


# -- data -------------------------------------------------------------------------------------------------
def build_examples(records: list[dict], fmt, margin_per_rank: float = 1.0) -> list[dict]:
    """One example per preference row: its responses encoded once, and its ordered pairs as indices.

    {"keys": ["edited", "chosen", "rejected"], "encs": [Encoded], "pairs": [(better, worse) index],
     "margins": [float per pair], "category": str, "id": str}"""
    out = []
    for r in records:
        pairs = ranked_pairs(r)
        if not pairs:
            continue
        keys = sorted({k for p in pairs for k in p}, key=lambda k: ("edited", "chosen", "rejected").index(k))
        encs = [fmt.encode_response(r, k) for k in keys]
        out.append({
            "keys": keys,
            "encs": encs,
            "pairs": [(keys.index(b), keys.index(w)) for b, w in pairs],
            "margins": [pair_margin(r, b, w, margin_per_rank) for b, w in pairs],
            "category": str(r.get("category") or r.get("source") or "all"),
            "id": str(r.get("id", r.get("_line", len(out)))),
        })
    return out


def collate_preferences(examples: list[dict], pad_id: int, one_row: bool, dtype=torch.float32,
                        rng: random.Random | None = None, flex: bool = False, pack_tokens: int = 0) -> dict:
    """Model inputs for a batch of examples, plus the pairs as indices into the rewards it yields.

    Rewards come out example by example, in each example's `keys` order, in both layouts.
    better, worse: [P] long; margin: [P] float."""
    if one_row:
        batch = collate_one_row([e["encs"] for e in examples], pad_id, dtype, rng, flex=flex, pack_tokens=pack_tokens)
    else:
        batch = collate_separate([enc for e in examples for enc in e["encs"]], pad_id)
    better, worse, margin, off = [], [], [], 0
    for e in examples:
        better += [off + b for b, _ in e["pairs"]]
        worse += [off + w for _, w in e["pairs"]]
        margin += e["margins"]
        off += len(e["encs"])
    batch.update(better=torch.tensor(better, dtype=torch.long), worse=torch.tensor(worse, dtype=torch.long),
                 margin=torch.tensor(margin, dtype=torch.float32))
    return batch


MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "index")


# -- one optimizer step ---------------------------------------------------------------------------------
def reward_step(model, micro_batches: list[dict], accelerator, world_size: int, use_margin: bool = False) -> tuple[float, float, int]:
    """Forward/backward over one optimizer step's micro-batches; returns (mean loss, pair accuracy, pairs),
    all over the whole step (all micro-batches, all processes).

    loss_i = bt_sum_i * world_size / N_step, where N_step counts the pairs of every micro-batch on every
    process; DDP then averages over processes, so the gradient is d(sum over pairs of the step / N_step)."""
    n_local = sum(int(mb["better"].numel()) for mb in micro_batches)
    n_step = int(accelerator.reduce(torch.tensor(n_local, device=accelerator.device), "sum")) if world_size > 1 else n_local
    total, correct = 0.0, 0
    for i, mb in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1
        with distributed.micro_batch(accelerator, model, last=sync):  # gradients synchronised on the last one
            inputs = packing.flex_inputs(mb)  # attention flex: the one-row BlockMask, built on the device
            rewards = model(**{k: inputs[k] for k in MODEL_KEYS})  # [N] float32
            r_b, r_w = rewards[mb["better"]], rewards[mb["worse"]]  # [P], [P]
            bt = bradley_terry_loss_sum(r_b, r_w, mb["margin"] if use_margin else None)
            accelerator.backward(bt * world_size / max(1, n_step))
            total += float(bt.detach())
            correct += int((r_b > r_w).sum())
    if world_size > 1:  # over every process: what one process with the whole batch reports
        total, correct = accelerator.reduce(torch.tensor([total, correct], dtype=torch.float64, device=accelerator.device), "sum").tolist()
    return total / max(1, n_step), correct / max(1, n_step), n_step


# -- eval -------------------------------------------------------------------------------------------------
def pair_metrics(pairs: list[dict], n_buckets: int = 5) -> dict:
    """Accuracy, margins and calibration of scored pairs ({"category", "type", "r_better", "r_worse"}).

    A pair is right when r_better > r_worse (a tie is wrong). Calibration: pairs split into `n_buckets`
    quantile buckets of |r_better - r_worse|, each with its accuracy; a calibrated model is more often right
    when the gap is larger."""
    if not pairs:
        return {"rm_accuracy": None, "eval_pairs": 0}
    gaps = [p["r_better"] - p["r_worse"] for p in pairs]
    right = [g > 0 for g in gaps]

    def acc(sel):
        sel = list(sel)
        return {"n": len(sel), "accuracy": round(sum(right[i] for i in sel) / len(sel), 4)}

    by = lambda field: {v: acc(i for i, p in enumerate(pairs) if p[field] == v)  # noqa: E731
                        for v in sorted({p[field] for p in pairs})}
    order = sorted(range(len(pairs)), key=lambda i: abs(gaps[i]))
    k = max(1, min(n_buckets, len(pairs)))
    buckets = []
    for b in range(k):
        sel = order[b * len(order) // k : (b + 1) * len(order) // k]
        if sel:
            buckets.append({"bucket": b, "abs_gap_min": round(abs(gaps[sel[0]]), 4),
                            "abs_gap_max": round(abs(gaps[sel[-1]]), 4), **acc(sel)})
    rewards = [p["r_better"] for p in pairs] + [p["r_worse"] for p in pairs]
    return {
        "rm_accuracy": round(sum(right) / len(right), 4),
        "eval_pairs": len(pairs),
        "rm_accuracy_by_category": {c: v["accuracy"] for c, v in by("category").items()},
        "rm_accuracy_by_pair": {t: v["accuracy"] for t, v in by("type").items()},
        "margin_mean": round(statistics.fmean(gaps), 4),
        "margin_median": round(statistics.median(gaps), 4),
        "reward_mean": round(statistics.fmean(rewards), 4),
        "reward_std": round(statistics.pstdev(rewards), 4),
        "calibration": buckets,
    }


def evaluate(model, fmt, examples: list[dict], batch_size: int) -> tuple[dict, list[dict]]:
    """Score every response of `examples` in its own row (as the sampling stage does) -> (metrics, pairs)."""
    encs: list[Encoded] = [enc for e in examples for enc in e["encs"]]
    rewards = score_sequences(model, fmt, encs, batch_size)
    pairs, off = [], 0
    for e in examples:
        for b, w in e["pairs"]:
            pairs.append({"id": e["id"], "category": e["category"], "type": f"{e['keys'][b]}>{e['keys'][w]}",
                          "r_better": rewards[off + b], "r_worse": rewards[off + w]})
        off += len(e["encs"])
    return pair_metrics(pairs), pairs


def main(recipe, out_dir: Path, inputs: dict) -> dict:
    """inputs: model (SFT/base causal LM or reward model dir, with tokenizer), data (preference records),
    eval_data (held-out preference records, optional)."""
    cfg = recipe.reward
    out_dir = Path(out_dir)
    accelerator = distributed.make_accelerator(out_dir, cfg.report_to, cfg, recipe.model.dtype)
    torch.manual_seed(recipe.seed)

    # -- setup ---------------------------------------------------------------------------------------
    fmt = load_tokenizer(inputs["model"], recipe.model.chat_template, recipe.model.template_date)
    eval_records, eval_report = [], None
    if inputs.get("eval_data"):
        eval_records, eval_report = load_preferences(inputs["eval_data"], fmt, max_length=cfg.max_length, overlong=cfg.overlong)
    records, report = load_preferences(inputs["data"], fmt, max_length=cfg.max_length, overlong=cfg.overlong,
                                       eval_prompts=prompt_keys(eval_records))
    for line in report.lines()[:20] + (eval_report.lines()[:5] if eval_report else []):
        accelerator.print(line)
    if not records:
        raise DataError(f"{inputs['data']}: no usable preference records")
    examples = build_examples(records, fmt, cfg.margin_per_rank)
    n_pairs = sum(len(e["pairs"]) for e in examples)
    no_eot = sum(enc.input_ids[-1] not in fmt.turn_end_ids for e in examples for enc in e["encs"])
    if no_eot:
        accelerator.print(f"warning: {no_eot} responses do not end in <|eot_id|> or <|eom_id|> (truncated); their reward is read at their last token")

    model, new_head = init_reward_model(inputs["model"], fmt.pad_id, recipe.model.dtype, seed=recipe.seed,
                                        dropout=recipe.model.dropout, quantization=recipe.model.quantization,
                                        device=accelerator.device)
    # from any init (sft, base, a path): untrained special rows of the backbone -> the mean embedding
    reset = models.init_special_embeddings(model, sorted(template_ids(fmt))) if cfg.init_special_embeddings else []
    accelerator.print(f"reward model from {inputs['model']}: {'new' if new_head else 'existing'} scalar head; "
                      f"{len(examples)} rows, {n_pairs} pairs, layout {'one row' if cfg.one_row else 'separate rows'}")
    applied = models.speedups(model, cfg, "reward", accelerator.device)  # attention flex, liger, compile
    model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.gradient_checkpointing)
    models.gradient_checkpointing(model, cfg.gradient_checkpointing)  # activations recomputed in the backward
    scorer = RewardScorer(model)
    models.fp32_master_weights(scorer, accelerator, cfg.master_weights)  # bf16 compute, float32 updates (or KahanAdamW)
    scorer.train()
    dtype = model_dtype(scorer)

    world = accelerator.num_processes
    plan = optim.plan_steps(len(examples), cfg, world, recipe.seed)
    optimizer, scheduler = optim.make_optimizer(scorer, cfg, len(plan))
    scorer, optimizer, scheduler = accelerator.prepare(scorer, optimizer, scheduler)

    run = checkpoints.start_or_resume(accelerator, out_dir, recipe, inputs, cfg, len(plan), "reward")

    # -- loop ----------------------------------------------------------------------------------------
    last_acc = None
    speed = tracking.Throughput(accelerator)
    bar = tracking.progress(range(run.start, len(plan)), desc="reward", disable=not accelerator.is_local_main_process,
                            initial=run.start, total=len(plan))
    for step in bar:
        micro = []
        for m, idx in enumerate(plan[step]):
            batch = [examples[i] for i in distributed.rank_slice(idx, accelerator.process_index, world)]
            rng = random.Random(f"reward-shuffle-{recipe.seed}-{step}-{m}-{accelerator.process_index}")
            mb = collate_preferences(batch, fmt.pad_id, cfg.one_row, dtype, rng, flex=cfg.attention == "flex",
                                     pack_tokens=cfg.pack_tokens)
            micro.append({k: v.to(accelerator.device) for k, v in mb.items()})
        loss, acc, pairs = reward_step(scorer, micro, accelerator, world, cfg.margin)
        speed.add(micro, fmt.pad_id, sum(len(mb["better"]) for mb in micro))
        grad_norm = accelerator.clip_grad_norm_(scorer.parameters(), cfg.max_grad_norm)
        if run.step_ok(step, loss, grad_norm):  # NaN/Inf: NonFiniteError, or (skip_step) no update
            optimizer.step()
            scheduler.step()
            last_acc = acc
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}")
            run.log_step(step, {"train/loss": loss, "train/accuracy": acc, **tracking.grad_norm_value(grad_norm),
                               "train/lr": scheduler.get_last_lr()[0], "train/pairs": pairs})
        optimizer.zero_grad(set_to_none=True)
        run.end_step(step, hf_model_for_save(accelerator, scorer), fmt.tokenizer)
    perf = speed.metrics()

    # -- save + eval ---------------------------------------------------------------------------------
    averaged = run.finish(hf_model_for_save(accelerator, scorer), fmt.tokenizer)  # out_dir/model, averaged with the snapshots when asked
    metrics = {"steps": len(plan), "examples": len(examples), "pairs": n_pairs, "special_embeddings_reset": reset,
               "first_loss": run.first_loss,
               "final_loss": run.last_loss, "final_train_accuracy": last_acc, "one_row": cfg.one_row,
               "margin": cfg.margin, "new_head": new_head, "responses_without_eot": no_eot, "master_weights": cfg.master_weights,
               "gradient_checkpointing": cfg.gradient_checkpointing, "pack_tokens": cfg.pack_tokens, **applied, **perf, "data": report.to_dict(), **averaged}
    if accelerator.is_main_process and eval_records:
        eval_examples = build_examples(eval_records, fmt, cfg.margin_per_rank)
        with distributed.local_load(accelerator):
            # as sampling loads it (nf4: 4-bit again, as it trained: a 70B in bf16 would not fit beside the training state)
            rm = load_reward_model(out_dir / "model", recipe.model.dtype, quantization=recipe.model.quantization,
                                   device=accelerator.device).to(accelerator.device)
        eval_metrics, eval_pairs = evaluate(rm, fmt, eval_examples, cfg.eval_batch_size)
        metrics.update(eval_metrics)
        metrics["eval_data"] = eval_report.to_dict()
        write_json(out_dir / "eval_rewards.json", [{**p, "r_better": round(p["r_better"], 5), "r_worse": round(p["r_worse"], 5)}
                                                  for p in eval_pairs])
    if accelerator.is_main_process:
        shutil.rmtree(run.ckpt_dir, ignore_errors=True)
    return metrics


def hf_model_for_save(accelerator, scorer):
    """The (possibly peft-wrapped) HF model inside the prepared scorer; save_model merges LoRA."""
    inner = accelerator.unwrap_model(scorer)
    return inner.model if isinstance(inner, RewardScorer) else hf_model(inner)
