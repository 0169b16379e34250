"""Stage 4: DPO, Llama 3 style: sigmoid DPO (beta 0.1) + 0.2 x NLL of the chosen response, formatting masked.

    python -m pipeline.run recipes/default.yaml --stage dpo [dpo.beta=0.1 dpo.data=preference ...]
    accelerate launch --config_file recipes/accelerate/<launcher>.yaml -m pipeline.run RECIPE --stage dpo

Setup -> reference log-probs -> loop -> save:
- data: preference pairs, validated by data.validate (bad records reported and skipped). Rejection-sampling
  pairs carry the completions' token ids (`chosen_ids`, `rejected_ids`): they are used as ids through
  `ChatFormat.encode_completion`, never decoded and re-encoded. A ranked record (edited > chosen > rejected)
  gives ONE pair: the best available response against the rejected one, i.e. (edited, rejected) when
  `edited` is present, else (chosen, rejected).
- masks: the final assistant turn only; with `mask_special_tokens` (default, Llama 3) its formatting tokens
  (<|eot_id|>, headers, pad) are masked out of the log-probs of chosen AND rejected in the DPO term, and out
  of the NLL term except the chosen response's eot (`nll_mask_special_tokens: false`, the default: with the
  eot masked everywhere nothing rewards stopping, and the policy learns to trail chatter; measured over 5
  seeds, see recipes/default.yaml). `nll_mask_special_tokens: true` masks it in the NLL term too. Off
  (`mask_special_tokens: false`): plain DPO on the completions, eot included (TRL's masks).
- loss (core.losses.dpo_nll_loss): DPO averaged over the pairs of the optimizer step + nll_weight x the
  chosen responses' NLL summed over the step and divided by the step's chosen-token count (all micro-batches,
  all processes), so gradient accumulation equals one big batch. Log-probs are float32 sums over tokens,
  the LM head run only at the positions that predict a trained token (core/logps.py).
- layout (`prefix_sharing`, default on): one row per pair, prompt then chosen then rejected, the prompt
  computed once; a 4D mask keeps the rejected tokens from seeing the chosen ones and their position ids
  continue from the prompt's end, so each response computes what its own row would (core/packing.py). With
  `pack_tokens`, several such pairs share a row (each its own document, no pad between them); with
  `attention: flex` the mask is a FlexAttention BlockMask. Off: two rows per pair (batch 2B, chosen first). Either way chosen and rejected go through the policy in ONE
  forward pass, and the reference log-probs are computed in the same layout.
- reference: the SFT model, frozen (eval mode, requires_grad False). By default (`precompute_ref`) its
  log-probs are computed once before training, then it is freed; otherwise on the fly. With LoRA the
  reference is the policy with its adapters disabled (peft `disable_adapter()`), never a second copy; with
  `model.quantization: nf4` (QLoRA) that is the same 4-bit base.
- metrics (TRL's names): rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies,
  logps/chosen, logps/rejected, nll, loss; logged to train_log.jsonl, their mean over the last steps
  returned, with the gold judge's figures of the trained policy.
- checkpoints every `save_every` steps (and the reference log-probs); a killed run resumes. A NaN/Inf loss or
  gradient norm stops the stage (or skips the update: `nan_policy`); SIGTERM/SIGINT checkpoints and exits.
- saves an HF model (safetensors, LoRA merged) in out_dir/model; with LoRA the adapters in out_dir/adapter.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from core.evaluate import evaluate_saved_policy
from core import checkpoints, distributed, models, optim, packing, tracking
from core.logps import completion_logps
from core.losses import dpo_nll_loss
from data.chat_format import ChatFormat, Encoded, collate, load_tokenizer
from data.doctor import template_ids
from data.validate import load_preferences, load_prompts, prompt_keys
from data.formats import DataError

METRICS = ("loss", "nll", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")


# -- data ---------------------------------------------------------------------------------------------------
def best_key(rec: dict) -> str:
    """The preferred response of a (possibly ranked) record: edited if present, else chosen."""
    return "edited" if rec.get("edited") or rec.get("edited_ids") else "chosen"


def build_pairs(records: list[dict], fmt: ChatFormat, max_length: int) -> tuple[list[tuple[Encoded, Encoded]], dict]:
    """(chosen, rejected) encodings, one pair per record, and counts of what was used and skipped."""
    pairs, counts = [], {"pairs": 0, "from_edited": 0, "skipped_overlong": 0, "skipped_prompt_ids_mismatch": 0}
    for rec in records:
        key = best_key(rec)
        chosen, rejected = fmt.encode_response(rec, key), fmt.encode_response(rec, "rejected")
        prompt_ids = rec.get("prompt_ids")
        if prompt_ids is not None and list(prompt_ids) != chosen.input_ids[: chosen.prompt_len]:
            counts["skipped_prompt_ids_mismatch"] += 1  # made with another template/tokenizer
            continue
        if max(len(chosen), len(rejected)) > max_length:
            counts["skipped_overlong"] += 1
            continue
        pairs.append((chosen, rejected))
        counts["from_edited"] += key == "edited"
    counts["pairs"] = len(pairs)
    return pairs, counts


def collate_pairs(pairs: list[tuple[Encoded, Encoded]], pad_id: int, mask_special_tokens: bool = True,
                  nll_mask_special_tokens: bool = False, prefix_sharing: bool = False,
                  mask_dtype: torch.dtype = torch.float32, pack_tokens: int = 0, flex: bool = False) -> dict:
    """One batch of R rows holding B pairs, for one forward pass.

    prefix_sharing: R = B rows of prompt, chosen response, rejected response (core/packing.py: the rejected
    tokens see the prompt and themselves, never the chosen ones, their position ids continue from the
    prompt's end), attention_mask [R, 1, T, T] additive `mask_dtype` (with `flex` doc and branch [R, T]
    instead, for packing.flex_inputs), position_ids and prev_pos [R, T]. With `pack_tokens`, R <= B rows:
    the pairs packed first fit into rows of at most pack_tokens tokens, each pair its own document. Otherwise
    R = 2B rows, the B chosen sequences first, then the B rejected ones, attention_mask [2B, T].

    chosen_mask, rejected_mask: [R, T], the DPO term's tokens: the final assistant turn, formatting tokens
    removed when `mask_special_tokens`. nll_mask: [R, T], the chosen tokens of the NLL term: the same, except
    that it keeps the eot when `nll_mask_special_tokens` is off. seq: [R, T], the pair each token belongs to
    (log-probs are summed per pair, core.logps)."""
    nll_special = mask_special_tokens and nll_mask_special_tokens
    chosen, rejected = [c for c, _ in pairs], [r for _, r in pairs]
    if prefix_sharing:
        bins, rows = packing.pack_rows([packing.prefix_row(list(p), doc=i) for i, p in enumerate(pairs)], pack_tokens)
        batch = packing.collate_rows(rows, pad_id, mask_dtype, flex=flex)  # input_ids, attention_mask, position_ids, prev_pos
        T = batch["input_ids"].shape[1]

        def per_seq(fn):  # a row's sequences: chosen, rejected of each of its pairs in turn
            return [[v for i in b for v in fn(i)] for b in bins]

        batch["chosen_mask"] = packing.place(rows, per_seq(lambda i: [chosen[i].completion_mask(mask_special_tokens), None]), T)
        batch["rejected_mask"] = packing.place(rows, per_seq(lambda i: [None, rejected[i].completion_mask(mask_special_tokens)]), T)
        batch["nll_mask"] = packing.place(rows, per_seq(lambda i: [chosen[i].completion_mask(nll_special), None]), T)
        batch["seq"] = packing.place(rows, per_seq(lambda i: [[i] * len(chosen[i]), [i] * len(rejected[i])]), T)
        return batch
    batch = collate(chosen + rejected, pad_id, mask="completion", mask_special_tokens=mask_special_tokens)
    is_chosen = (torch.arange(2 * len(pairs)) < len(pairs))[:, None]  # [2B, 1]
    loss_mask = batch.pop("loss_mask")  # [2B, T]
    batch["chosen_mask"], batch["rejected_mask"] = loss_mask * is_chosen, loss_mask * ~is_chosen
    nll = loss_mask if nll_special == mask_special_tokens else collate(chosen + rejected, pad_id, "completion", nll_special)["loss_mask"]
    batch["nll_mask"] = nll * is_chosen
    batch["seq"] = torch.arange(len(pairs)).repeat(2)[:, None].expand_as(loss_mask).contiguous()
    return batch


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# -- log-probs ------------------------------------------------------------------------------------------------
def pair_logps(model, batch: dict, nll: bool = False) -> tuple[torch.Tensor, ...]:
    """Summed float32 completion log-probs of a collated pair batch: (chosen [B], rejected [B]), and with
    `nll` the chosen ones under the NLL term's mask too ([B]); one forward pass, one log-softmax."""
    masks = [batch["chosen_mask"], batch["rejected_mask"]] + ([batch["nll_mask"]] if nll else [])
    batch = packing.flex_inputs(batch)  # FlexAttention: the BlockMask, built here on the batch's device
    return tuple(completion_logps(model, batch["input_ids"], batch["attention_mask"], masks, prev_pos=batch.get("prev_pos"),
                                  seq=batch["seq"], position_ids=batch.get("position_ids")))  # each [B]: per pair


def load_reference(path, dtype: str, reset: list[int] = ()):
    """The frozen reference: eval mode (no dropout), no gradients, never given to the optimizer; the special
    rows `reset` in the policy reset the same way (the same function on the same weights)."""
    ref = models.load_causal_lm(path, dtype)
    if reset:
        models.init_special_embeddings(ref, list(reset))
    ref.eval()
    ref.requires_grad_(False)
    return ref


def prepare_reference(ref, accelerator):
    """Place the frozen reference for the launcher, after the policy was prepared.

    DeepSpeed ZeRO-3: its own DeepSpeed inference engine, sharded like the policy, no optimizer (as TRL's
    prepare_deepspeed); FSDP2: sharded per decoder layer (fully_shard, the launcher's mixed precision);
    otherwise (one process, DDP, ZeRO-1/2): a full copy on each device. Every process must call it."""
    if accelerator.distributed_type.name == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import copy

        import deepspeed

        ds = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        ds.pop("optimizer", None)
        ds.pop("scheduler", None)
        ds["zero_optimization"].pop("offload_optimizer", None)
        h = ref.config.hidden_size
        ds["zero_optimization"].update({"reduce_bucket_size": h * h, "stage3_param_persistence_threshold": 10 * h,
                                        "stage3_prefetch_bucket_size": int(0.9 * h * h)})
        engine, *_ = deepspeed.initialize(model=ref, config=ds)
        engine.eval()
        return engine
    ref = ref.to(accelerator.device)
    if getattr(accelerator, "is_fsdp2", False):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        plugin = accelerator.state.fsdp_plugin
        kw = {"reshard_after_forward": True, "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
        layers = set(plugin.transformer_cls_names_to_wrap or ())
        for m in ref.modules():
            if type(m).__name__ in layers:
                fully_shard(m, **kw)
        fully_shard(ref, **kw)
    return ref


@torch.no_grad()
def reference_logps(batch: dict, ref_model=None, policy=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs (chosen [B], rejected [B]): from `ref_model`, or with LoRA from the unwrapped peft
    `policy` with its adapters disabled (and in eval mode for the call)."""
    if ref_model is not None:
        return pair_logps(ref_model, batch)
    was_training = policy.training
    policy.eval()
    try:
        with policy.disable_adapter():
            return pair_logps(policy, batch)
    finally:
        policy.train(was_training)


def precompute_reference(pairs, fmt: ChatFormat, cfg, accelerator, ref_model=None, policy=None,
                         mask_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, float]:
    """(Reference log-probs of every pair, [N, 2] (chosen, rejected) on CPU; the seconds of the first batch,
    which pays for compiling kernels: how much of the pass is warm-up). Each process does a shard."""
    n, world, rank = len(pairs), accelerator.num_processes, accelerator.process_index
    shard = -(-n // world)
    mine = list(range(rank * shard, min(n, (rank + 1) * shard)))
    mine += [mine[-1] if mine else 0] * (shard - len(mine))  # equal forward passes on every process (ZeRO-3
    # gathers weights collectively); the padded rows land past n and are dropped
    out = torch.zeros(shard, 2, dtype=torch.float32, device=accelerator.device)
    # forward only, no graph kept: twice the training micro-batch (packed: into rows of twice pack_tokens)
    bs, pack = 2 * cfg.batch_size, 2 * cfg.pack_tokens
    bar = tracking.progress(range(0, len(mine), bs), desc="reference log-probs", disable=not accelerator.is_local_main_process)
    t0, first = time.perf_counter(), 0.0
    for i in bar:
        idx = mine[i : i + bs]
        batch = collate_pairs([pairs[j] for j in idx], fmt.pad_id, cfg.mask_special_tokens, prefix_sharing=cfg.prefix_sharing,
                              mask_dtype=mask_dtype, pack_tokens=pack, flex=cfg.attention == "flex")
        ref_chosen, ref_rejected = reference_logps(to_device(batch, accelerator.device), ref_model, policy)
        out[i : i + len(idx)] = torch.stack([ref_chosen, ref_rejected], -1)
        if i == 0:  # the first batch pays for compiling kernels
            out[0, 0].item()  # waits for the batch's kernels
            first = time.perf_counter() - t0
    if world > 1:
        out = accelerator.gather(out)  # [world * shard, 2], in rank order
    return out[:n].cpu(), first


# -- one optimizer step ---------------------------------------------------------------------------------------
def dpo_step(model, micro_batches: list[dict], cfg, accelerator, world_size: int) -> dict:
    """Forward/backward over one optimizer step's micro-batches; returns the step's metrics.

    Each micro-batch holds a collated pair batch (collate_pairs: R rows of B pairs) and `ref_chosen`,
    `ref_rejected` ([B]). loss_i = dpo_nll_loss(..., n_pairs=P_step, n_chosen_tokens=N_step)
    * world_size, where P_step and N_step count the pairs and NLL tokens of every micro-batch on every
    process; DDP averages over processes, so the gradient is d(sum dpo / P_step + w * sum nll / N_step)
    whatever the accumulation and the number of processes."""
    local = torch.tensor([sum(mb["ref_chosen"].numel() for mb in micro_batches),
                          sum(int(mb["nll_mask"][:, 1:].sum()) for mb in micro_batches)],
                         dtype=torch.float64, device=accelerator.device)
    n_pairs, n_tokens = (accelerator.reduce(local, "sum") if world_size > 1 else local).tolist()
    sums = torch.zeros(7, dtype=torch.float64, device=accelerator.device)
    for i, mb in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1
        with distributed.micro_batch(accelerator, model, last=sync):  # gradients synchronised on the last one
            pc, pr, pc_nll = pair_logps(model, mb, nll=True)  # [B] each
            loss, losses, chosen_rewards, rejected_rewards = dpo_nll_loss(pc, pr, mb["ref_chosen"], mb["ref_rejected"], cfg.beta, cfg.nll_weight,
                                                n_chosen_tokens=n_tokens, n_pairs=n_pairs, chosen_nll_logps=pc_nll)
            accelerator.backward(loss * world_size)
            pc, pr = pc.detach(), pr.detach()
            sums += torch.stack([losses.detach().sum(), -pc_nll.detach().sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                                 (chosen_rewards > rejected_rewards).float().sum(), pc.sum(), pr.sum()]).double()
    if world_size > 1:
        sums = accelerator.reduce(sums, "sum")
    dpo_sum, nll_sum, chosen_sum, rejected_sum, acc_sum, pc_sum, pr_sum = sums.tolist()
    p, t = max(1.0, n_pairs), max(1.0, n_tokens)
    return {"loss": dpo_sum / p + cfg.nll_weight * nll_sum / t, "dpo": dpo_sum / p, "nll": nll_sum / t,
            "rewards/chosen": chosen_sum / p, "rewards/rejected": rejected_sum / p,
            "rewards/margins": (chosen_sum - rejected_sum) / p,
            "rewards/accuracies": acc_sum / p, "logps/chosen": pc_sum / p, "logps/rejected": pr_sum / p,
            "pairs": int(n_pairs), "tokens": int(n_tokens)}


# -- the stage ----------------------------------------------------------------------------------------------------
def main(recipe, out_dir: Path, inputs: dict) -> dict:
    """inputs: model (SFT HF dir with tokenizer: policy init and reference), data (preference pairs),
    eval_prompts (optional, default task: gold-judge figures of the trained policy)."""
    cfg = recipe.dpo
    out_dir = Path(out_dir)
    accelerator = distributed.make_accelerator(out_dir, cfg.report_to, cfg, recipe.model.dtype)
    torch.manual_seed(recipe.seed)

    # -- setup ---------------------------------------------------------------------------------------------
    fmt = load_tokenizer(inputs["model"], recipe.model.chat_template, recipe.model.template_date)
    eval_keys = prompt_keys(load_prompts(inputs["eval_prompts"])[0]) if inputs.get("eval_prompts") else None
    records, report = load_preferences(inputs["data"], fmt, max_length=cfg.max_length, overlong=cfg.overlong,
                                       eval_prompts=eval_keys)  # held-out prompts never trained on
    for line in report.lines()[:20]:
        accelerator.print(line)
    pairs, pair_counts = build_pairs(records, fmt, cfg.max_length)
    if not pairs:
        raise DataError(f"{inputs['data']}: no usable preference pairs")
    accelerator.print(f"dpo: {len(pairs)} pairs ({pair_counts['from_edited']} edited > rejected), "
                      f"mask_special_tokens={cfg.mask_special_tokens}, precompute_ref={cfg.precompute_ref}, "
                      f"prefix_sharing={cfg.prefix_sharing}, pack_tokens={cfg.pack_tokens}, "
                      f"gradient_checkpointing={cfg.gradient_checkpointing}, master_weights={cfg.master_weights}")

    model = models.load_causal_lm(inputs["model"], recipe.model.dtype, recipe.model.dropout, recipe.model.quantization,
                                  accelerator.device)  # nf4 (LoRA required): the reference is this 4-bit base too
    # the same rows reset in the reference (below), so that policy and reference agree at step 0
    reset = models.init_special_embeddings(model, sorted(template_ids(fmt))) if cfg.init_special_embeddings else []
    applied = models.speedups(model, cfg, "dpo", accelerator.device)  # attention flex, liger, compile
    model = models.apply_lora(model, cfg.lora, gradient_checkpointing=cfg.gradient_checkpointing)
    models.gradient_checkpointing(model, cfg.gradient_checkpointing)  # activations recomputed in the backward
    models.fp32_master_weights(model, accelerator, cfg.master_weights)  # bf16 compute, float32 updates; the frozen reference stays bf16
    model.train()
    ref_model = None if cfg.lora is not None else load_reference(inputs["model"], recipe.model.dtype, reset)
    if ref_model is not None and cfg.attention == "flex":  # the batches carry a BlockMask: both models read it
        ref_model.set_attn_implementation("flex_attention")
    mask_dtype = models.torch_dtype(recipe.model.dtype)  # prefix sharing's 4D mask: the attention's compute dtype

    world = accelerator.num_processes
    plan = optim.plan_steps(len(pairs), cfg, world, recipe.seed)
    optimizer, scheduler = optim.make_optimizer(model, cfg, len(plan))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ref_model = prepare_reference(ref_model, accelerator) if ref_model is not None else None
    policy = accelerator.unwrap_model(model)  # for disable_adapter() when the reference is the LoRA base

    run = checkpoints.start_or_resume(accelerator, out_dir, recipe, inputs, cfg, len(plan), "dpo")

    ref_table, ref_seconds, ref_first = None, 0.0, None  # [N, 2] reference log-probs when precomputed, what that took
    if cfg.precompute_ref:
        t0 = time.perf_counter()
        cache = run.ckpt_dir / "ref_logps.pt"
        saved = torch.load(cache, weights_only=True) if cache.exists() else None
        if saved is not None and saved.get("config_hash") == run.config_hash and len(saved["logps"]) == len(pairs):
            ref_table = saved["logps"]
        else:
            ref_table, ref_first = precompute_reference(pairs, fmt, cfg, accelerator, ref_model, policy, mask_dtype)
            if accelerator.is_main_process:  # save_every 0 too: a SIGTERM checkpoints at any step
                run.ckpt_dir.mkdir(parents=True, exist_ok=True)
                torch.save({"config_hash": run.config_hash, "logps": ref_table}, cache.with_suffix(".tmp"))
                os.replace(cache.with_suffix(".tmp"), cache)  # atomic: a killed save leaves no torn cache
        ref_model = None  # freed: never needed again
        ref_seconds = time.perf_counter() - t0  # part of the stage's cost: the loop's pairs/s leaves it out

    # -- loop --------------------------------------------------------------------------------------------------
    history: list[dict] = []
    speed = tracking.Throughput(accelerator)
    bar = tracking.progress(range(run.start, len(plan)), desc="dpo", disable=not accelerator.is_local_main_process,
                            initial=run.start, total=len(plan))
    for step in bar:
        micro = []
        for idx in plan[step]:
            mine = distributed.rank_slice(idx, accelerator.process_index, world)
            batch = collate_pairs([pairs[i] for i in mine], fmt.pad_id, cfg.mask_special_tokens, cfg.nll_mask_special_tokens,
                                  cfg.prefix_sharing, mask_dtype, cfg.pack_tokens, cfg.attention == "flex")
            mb = to_device(batch, accelerator.device)
            if ref_table is not None:
                ref = ref_table[mine].to(accelerator.device)
                mb["ref_chosen"], mb["ref_rejected"] = ref[:, 0], ref[:, 1]
            else:
                mb["ref_chosen"], mb["ref_rejected"] = reference_logps(mb, ref_model, policy)
            micro.append(mb)
        stats = dpo_step(model, micro, cfg, accelerator, world)
        speed.add(micro, fmt.pad_id, sum(len(mb["ref_chosen"]) for mb in micro))
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        if run.step_ok(step, stats["loss"], grad_norm):  # NaN/Inf: NonFiniteError, or (skip_step) no update
            optimizer.step()
            scheduler.step()
            history.append(stats)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['rewards/accuracies']:.2f}")
            run.log_step(step, {**{f"train/{k}": stats[k] for k in (*METRICS, "dpo", "tokens")},
                               **tracking.grad_norm_value(grad_norm), "train/lr": scheduler.get_last_lr()[0]})
        optimizer.zero_grad(set_to_none=True)
        run.end_step(step, model, fmt.tokenizer)
    perf = speed.metrics()

    # -- save + eval -------------------------------------------------------------------------------------------
    averaged = run.finish(model, fmt.tokenizer)  # out_dir/model, averaged with the snapshots when asked
    tail = history[-max(1, min(len(history), cfg.log_every)) :]  # the last steps of this run
    metrics = {"steps": len(plan), "first_loss": run.first_loss, "final_loss": run.last_loss, "special_embeddings_reset": reset,
               **{k: round(sum(s[k] for s in tail) / len(tail), 6) for k in METRICS if tail},
               "pairs": pair_counts, "data": report.to_dict(), "beta": cfg.beta, "nll_weight": cfg.nll_weight,
               "mask_special_tokens": cfg.mask_special_tokens,
               "nll_mask_special_tokens": cfg.nll_mask_special_tokens, "prefix_sharing": cfg.prefix_sharing,
               "pack_tokens": cfg.pack_tokens, "gradient_checkpointing": cfg.gradient_checkpointing,
               "master_weights": cfg.master_weights, **applied, "ref_precompute_seconds": round(ref_seconds, 2),
               "ref_precompute_first_batch_seconds": ref_first and round(ref_first, 2), **perf, **averaged}
    metrics.update(evaluate_saved_policy(accelerator, out_dir, recipe, fmt, inputs.get("eval_prompts")))
    if accelerator.is_main_process:
        shutil.rmtree(run.ckpt_dir, ignore_errors=True)  # the model is saved: its checkpoints are done with
    return metrics
