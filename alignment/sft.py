"""Stage 1: supervised fine-tuning, loss on assistant tokens only.

    python -m pipeline.run recipes/default.yaml --stage sft [sft.lr=1e-4 ...]     # via the pipeline
    accelerate launch --config_file recipes/accelerate/<launcher>.yaml -m pipeline.run RECIPE --stage sft

Setup -> loop -> save:
- data: `messages` records, validated (bad records reported and skipped), tokenized by the shared chat
  format: prompt, headers and BOS masked; assistant content and its <|eot_id|> trained.
- loss: summed token NLL divided by the number of trained tokens of the whole optimizer step (all
  micro-batches and all processes), so gradient accumulation equals one big batch. The LM head runs only at
  the positions that predict a trained token (core/logps.py).
- packing (`pack_tokens` > 0): a micro-batch's conversations go into rows of at most pack_tokens tokens
  (first fit), no pad between them, position ids restarting at each, and each sees only itself (the
  block-diagonal causal mask transformers builds from those position ids): the same loss and gradients as
  a row each (tests/test_packing.py), without the pad positions.
- checkpoints every `save_every` steps; a killed run resumes from the last complete one. A NaN/Inf loss or
  gradient norm stops the stage (or skips the update: `nan_policy`); SIGTERM/SIGINT checkpoints and exits.
- saves an HF model (safetensors, LoRA merged) that the reward, sampling and DPO stages load (with LoRA the
  adapters too, in out_dir/adapter).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from core.evaluate import evaluate_saved_policy
from core import checkpoints, distributed, models, optim, packing, tracking
from core.logps import completion_logps
from data.chat_format import Encoded, collate, load_tokenizer
from data.doctor import template_ids
from data.validate import load_prompts, load_sft, prompt_keys
from data.formats import DataError


def collate_sft(batch: list[Encoded], pad_id: int, pack_tokens: int = 0) -> dict:
    """One micro-batch. input_ids, loss_mask (every assistant turn with its eot): [B, T], a row per
    conversation, with attention_mask [B, T]; or with `pack_tokens` [R, T'], R <= B rows of at most
    pack_tokens tokens (a longer conversation alone), with position_ids and prev_pos [R, T'] and no
    attention_mask (core/packing.py: transformers builds the per-conversation mask from the position ids)."""
    if not pack_tokens:
        return collate(batch, pad_id, "assistant")
    bins = [[batch[i] for i in b] for b in packing.pack_greedy([len(e) for e in batch], pack_tokens)]
    rows = [packing.document_row(encs) for encs in bins]
    out = packing.collate_rows(rows, pad_id, mask_dtype=None)  # input_ids, position_ids, prev_pos
    out["loss_mask"] = packing.place(rows, [[e.assistant_mask for e in encs] for encs in bins], out["input_ids"].shape[1])
    return out


def sft_step(model, micro_batches: list[dict], accelerator, world_size: int) -> tuple[float, int]:
    """Forward/backward over one optimizer step's micro-batches; returns (mean loss, trained tokens), both
    over the whole step (all micro-batches, all processes).

    loss_i = nll_sum_i * world_size / N_step, where N_step counts trained tokens of every micro-batch on
    every process; DDP then averages over processes, so the gradient is d(sum nll / N_step)."""
    n_local = sum(int(mb["loss_mask"][:, 1:].sum()) for mb in micro_batches)
    n_step = int(accelerator.reduce(torch.tensor(n_local, device=accelerator.device), "sum")) if world_size > 1 else n_local
    total = 0.0
    for i, mb in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1
        with distributed.micro_batch(accelerator, model, last=sync):  # gradients synchronised on the last one
            (logps,) = completion_logps(model, mb["input_ids"], mb.get("attention_mask"), [mb["loss_mask"]],
                                        prev_pos=mb.get("prev_pos"), position_ids=mb.get("position_ids"))  # [rows]
            nll = -logps.sum()
            loss = nll * world_size / max(1, n_step)
            accelerator.backward(loss)
            total += nll.item()
    if world_size > 1:  # the step's mean over every process: what one process with the whole batch reports
        total = accelerator.reduce(torch.tensor(total, dtype=torch.float64, device=accelerator.device), "sum").item()
    return total / max(1, n_step), n_step


def main(recipe, out_dir: Path, inputs: dict) -> dict:
    """inputs: model (HF dir with tokenizer), data (SFT records), eval_prompts (optional, default task)."""
    cfg = recipe.sft
    out_dir = Path(out_dir)
    accelerator = distributed.make_accelerator(out_dir, cfg.report_to, cfg, recipe.model.dtype)
    torch.manual_seed(recipe.seed)

    # -- setup ---------------------------------------------------------------------------------------
    fmt = load_tokenizer(inputs["model"], recipe.model.chat_template, recipe.model.template_date)
    eval_keys = prompt_keys(load_prompts(inputs["eval_prompts"])[0]) if inputs.get("eval_prompts") else None
    records, report = load_sft(inputs["data"], fmt, max_length=cfg.max_length, overlong=cfg.overlong,
                               eval_prompts=eval_keys)  # held-out prompts never trained on (eval_overlap)
    for line in report.lines()[:20]:
        accelerator.print(line)
    if not records:
        raise DataError(f"{inputs['data']}: no usable SFT records: {report.summary()}")
    examples = [r["encoded"] for r in records]

    model = models.load_causal_lm(inputs["model"], recipe.model.dtype, recipe.model.dropout, recipe.model.quantization,
                                  accelerator.device)  # nf4: quantized on this process's device as it loads
    reset = models.init_special_embeddings(model, sorted(template_ids(fmt))) if cfg.init_special_embeddings else []
    applied = models.speedups(model, cfg, "sft", accelerator.device)  # attention flex (packed rows: transformers' block mask), liger, compile
    model = models.apply_lora(model, cfg.lora, gradient_checkpointing=cfg.gradient_checkpointing)
    models.gradient_checkpointing(model, cfg.gradient_checkpointing)  # activations recomputed in the backward
    models.fp32_master_weights(model, accelerator, cfg.master_weights)  # bf16 compute, float32 updates (or KahanAdamW)
    model.train()

    world = accelerator.num_processes
    plan = optim.plan_steps(len(examples), cfg, world, recipe.seed)
    optimizer, scheduler = optim.make_optimizer(model, cfg, len(plan))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    run = checkpoints.start_or_resume(accelerator, out_dir, recipe, inputs, cfg, len(plan), "sft")

    # -- loop ----------------------------------------------------------------------------------------
    speed = tracking.Throughput(accelerator)
    bar = tracking.progress(range(run.start, len(plan)), desc="sft", disable=not accelerator.is_local_main_process,
                            initial=run.start, total=len(plan))
    for step in bar:
        micro, n_conversations = [], 0
        for idx in plan[step]:
            batch = [examples[i] for i in distributed.rank_slice(idx, accelerator.process_index, world)]
            micro.append({k: v.to(accelerator.device) for k, v in collate_sft(batch, fmt.pad_id, cfg.pack_tokens).items()})
            n_conversations += len(batch)
        loss, n_tokens = sft_step(model, micro, accelerator, world)
        speed.add(micro, fmt.pad_id, n_conversations)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        if run.step_ok(step, loss, grad_norm):  # NaN/Inf: NonFiniteError, or (skip_step) no update
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss:.3f}")
            run.log_step(step, {"train/loss": loss, **tracking.grad_norm_value(grad_norm), "train/lr": scheduler.get_last_lr()[0], "train/tokens": n_tokens})
        optimizer.zero_grad(set_to_none=True)
        run.end_step(step, model, fmt.tokenizer)
    perf = speed.metrics()

    # -- save + eval ---------------------------------------------------------------------------------
    averaged = run.finish(model, fmt.tokenizer)  # out_dir/model, averaged with the snapshots when asked; skipped_steps
    metrics = {"steps": len(plan), "examples": len(examples), "first_loss": run.first_loss, "final_loss": run.last_loss,
               "data": report.to_dict(), "special_embeddings_reset": reset, "pack_tokens": cfg.pack_tokens,
               "gradient_checkpointing": cfg.gradient_checkpointing, "master_weights": cfg.master_weights, **applied,
               **perf, **averaged}
    metrics.update(evaluate_saved_policy(accelerator, out_dir, recipe, fmt, inputs.get("eval_prompts")))
    if accelerator.is_main_process:
        shutil.rmtree(run.ckpt_dir, ignore_errors=True)  # the model is saved: its checkpoints are done with
    return metrics
