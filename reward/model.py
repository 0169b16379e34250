"""The reward model: the policy architecture with a scalar head, and how sequences are scored.

    model = init_reward_model("runs/default/sft/model", fmt.pad_id)       # training: SFT weights + new head
    model = load_reward_model("runs/default/reward/model")                # sampling: a trained reward model
    rewards = score_sequences(model, fmt, [fmt.encode_preference(prompt, response), ...], batch_size=16)

The model is `AutoModelForSequenceClassification` (for Llama: `LlamaForSequenceClassification`) with
num_labels = 1, loaded from safetensors, no remote code. Its head `score` is newly initialised from an SFT
causal LM (normal, std 1/sqrt(hidden + 1), so initial rewards are O(1)). We never use HF's pooled output,
which finds the "last non-pad token" by comparing ids with the pad id: the reward of a response is read
from the backbone's final hidden state at the response's final token (its `<|eot_id|>`), at an index this
module computes from the sequence lengths, whatever the padding side or amount.

Two ways to lay out a preference row, both scored through `RewardScorer`:

- separate rows (`collate_separate`): one sequence per response, padded, 2D attention mask, position ids
  counted over real tokens only (so left padding changes nothing);
- one row (`collate_one_row`, Llama 3): the prompt and its 2-3 responses in one sequence,
  ``[prompt][response A][response B][response C]``, order shuffled, prompt encoded once. A 4D mask makes
  it exact, not an approximation:

      key ->        prompt   A        B
      prompt        causal   -        -
      A             all      causal   -
      B             all      -        causal

  and each response's position ids restart at the prompt's end, so every token sees the same keys at
  the same positions as in its own row: the scores equal separate rows (tests check 1e-5 in fp32). The
  layout and its additive float mask are core/packing.py's shared-prefix rows, which DPO's prefix sharing
  uses too.
"""

from __future__ import annotations

import json
import math
import os
import random

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

from core import packing
from core.distributed import gathered
from core.models import apply_lora as _apply
from core.models import ModelFolderError, quantized_load, require_safetensors, torch_dtype

from data.chat_format import Encoded
from data.doctor import dropout_overrides


# -- loading --------------------------------------------------------------------------------------------
def _load(path, dtype: str, attn_implementation: str, **kwargs):
    """(model, loading info). HF's load report is silenced: the callers check the missing keys themselves
    (a causal LM has no `score` and an unused `lm_head`; anything else missing is an error)."""
    require_safetensors(path)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=1, dtype=torch_dtype(dtype), use_safetensors=True, trust_remote_code=False,
            attn_implementation=attn_implementation, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("score."))
    if missing:
        raise ModelFolderError(f"{path}: weights missing for {type(model).__name__}: {', '.join(missing[:4])}")
    return model, info


def check_reward_folder(path: str | os.PathLike) -> None:
    """A trained reward model folder, checked from its files alone (config.json and the safetensors headers):
    safetensors weights with a `score` head, and a pad token id. The sampling stage checks it before its
    engines start (a worker failing minutes later would be a traceback); load_reward_model checks it too."""
    p = require_safetensors(path)
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{p}: cannot read config.json: {e}") from None
    from safetensors import safe_open

    keys: set[str] = set()
    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                keys.update(h.keys())
        except Exception as e:  # a torn or foreign file: one line
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelFolderError(f"{f}: cannot read as safetensors: {why}") from None
    if not any(k == "score.weight" or k.endswith(".score.weight") for k in keys):
        raise ModelFolderError(f"{p}: not a trained reward model (no `score` head weights); give the reward stage's "
                               "model folder (runs/<name>/reward/model)")
    if config.get("pad_token_id") is None:
        raise ModelFolderError(f"{p}: reward model config has no pad_token_id")


def init_reward_model(path: str | os.PathLike, pad_id: int, dtype: str = "float32", attn_implementation: str = "sdpa",
                      seed: int = 0, dropout: float | None = 0.0, quantization: str = "none",
                      device=None) -> tuple[nn.Module, bool]:
    """A sequence-classification model from a causal LM (SFT or base) or reward model folder.

    Returns (model, new_head). A head missing from the checkpoint is initialised normal(0, 1/sqrt(hidden+1))
    from `seed`; a reward model's own head is kept. `dropout` (model.dropout): every dropout of its config
    (None keeps the checkpoint's). `quantization` (model.quantization) nf4: the body's linear layers in 4 bits,
    quantized on `device` as they load (core.models.quantized_load); the score head stays in `dtype`."""
    model, info = _load(path, dtype, attn_implementation, pad_token_id=pad_id, **dropout_overrides(path, dropout),
                        **quantized_load(quantization, device))
    model.config.pad_token_id = pad_id
    new_head = any(k.startswith("score.") for k in info["missing_keys"])
    if new_head:
        with gathered([model.score.weight]), torch.no_grad():  # ZeRO-3 init: the whole head, kept from process 0
            hidden = model.score.weight.shape[1]
            gen = torch.Generator().manual_seed(seed)
            w = torch.randn(model.score.weight.shape, generator=gen) / math.sqrt(hidden + 1)
            model.score.weight.copy_(w.to(model.score.weight.dtype))
    return model, new_head


def load_reward_model(path: str | os.PathLike, dtype: str = "float32", attn_implementation: str = "sdpa",
                      quantization: str = "none", device=None) -> nn.Module:
    """A trained reward model folder (as the reward stage saves it), in eval mode, for scoring; `quantization`
    nf4: its body 4-bit, quantized on `device` as it loads (the head stays in `dtype`)."""
    check_reward_folder(path)
    model, info = _load(path, dtype, attn_implementation, **quantized_load(quantization, device))
    if any(k.startswith("score.") for k in info["missing_keys"]):  # a head saved under a name HF does not map
        raise ModelFolderError(f"{path}: not a trained reward model (no `score` head weights)")
    return model.eval()


def apply_lora(model, lora_cfg, gradient_checkpointing: bool | None = None):
    """LoRA adapters for a sequence-classification model (peft task SEQ_CLS: the head stays fully trained, in
    float32 through fp32_master_weights, also on a 4-bit body)."""
    return _apply(model, lora_cfg, task_type="SEQ_CLS", gradient_checkpointing=gradient_checkpointing)


def hf_model(model) -> nn.Module:
    """The HF sequence-classification model inside a RewardScorer / peft / DDP wrapper."""
    while True:
        if isinstance(model, RewardScorer):
            model = model.model
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


# -- scoring ----------------------------------------------------------------------------------------------
class RewardScorer(nn.Module):
    """Backbone + scalar head, read at given positions. Wrap this (not the HF model) with accelerate/DDP,
    so that its forward is the one that runs and gradients synchronise."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, index) -> torch.Tensor:
        """input_ids [B, T]; attention_mask [B, T] (1 = real) or [B, 1, T, T] additive float; position_ids
        [B, T]; index [N, 2] (row, position) of each reward -> rewards [N] float32."""
        hf = hf_model(self.model)
        hidden = hf.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state  # [B, T, H]
        h = hidden[index[:, 0], index[:, 1]]  # [N, H]
        return hf.score(h).squeeze(-1).float()  # [N]


def collate_separate(encs: list[Encoded], pad_id: int, side: str = "right", pad_to: int = 0) -> dict:
    """One row per sequence, padded on `side` to max(longest, pad_to). Reward index: each row's last real
    token (its final <|eot_id|>), from the lengths. Position ids count real tokens only."""
    T = max(max(len(e) for e in encs), pad_to)
    ids = torch.full((len(encs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(encs), T), dtype=torch.long)
    last = []
    for b, e in enumerate(encs):
        n = len(e)
        start = 0 if side == "right" else T - n
        ids[b, start : start + n] = torch.tensor(e.input_ids)
        attn[b, start : start + n] = 1
        last.append(start + n - 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    index = torch.stack([torch.arange(len(encs)), torch.tensor(last)], -1)
    return {"input_ids": ids, "attention_mask": attn, "position_ids": pos, "index": index}


def collate_one_row(groups: list[list[Encoded]], pad_id: int, dtype: torch.dtype = torch.float32,
                    rng: random.Random | None = None, pad_to: int = 0, flex: bool = False, pack_tokens: int = 0) -> dict:
    """One row per group (a prompt's 2-3 responses), right-padded: core.packing's shared-prefix row, the
    placement of the responses shuffled by `rng`. Rewards come out group by group, in each group's given
    order, whatever the placement: index [N, 2] (row, position of each response's last token). With `flex`,
    doc and branch [B, T] instead of attention_mask (packing.flex_inputs makes the BlockMask on the device).
    With `pack_tokens`, the groups' rows packed first fit into rows of at most pack_tokens tokens, each group
    its own document; the rewards still come out group by group in the given order."""
    if any(len(r) == 0 for g in groups for r in packing.split_prompt(g)[1]):  # its reward would be the prompt's
        raise ValueError("one-row layout: a response is empty after the shared prompt (identical encodings?)")
    bins, rows = packing.pack_rows([packing.prefix_row(g, rng, doc=i) for i, g in enumerate(groups)], pack_tokens)
    batch = packing.collate_rows(rows, pad_id, dtype, pad_to, flex)  # input_ids, position_ids, attention_mask [B, 1, T, T]
    batch.pop("prev_pos")
    last = {}  # group -> the (row, position) of each of its responses' last token
    for b, (members, row) in enumerate(zip(bins, rows)):
        seqs = iter(row.where)
        for i in members:
            last[i] = [(b, next(seqs)[-1]) for _ in groups[i]]
    batch["index"] = torch.tensor([x for i in range(len(groups)) for x in last[i]], dtype=torch.long)
    return batch


def model_dtype(model) -> torch.dtype:
    return next(hf_model(model).parameters()).dtype


@torch.no_grad()
def score_sequences(model, fmt, encoded_list: list[Encoded], batch_size: int) -> list[float]:
    """Reward of each sequence (prompt + response, ending in its <|eot_id|>), in input order, as floats.

    Separate right-padded rows, batched by length; the reward is read at each sequence's last real token.
    A sequence cut off without an eot is scored at its last token. `model` is an HF reward model (or a
    RewardScorer); it is put in eval mode."""
    if not encoded_list:
        return []
    scorer = model if isinstance(model, RewardScorer) else RewardScorer(model)
    scorer.eval()
    device = next(scorer.parameters()).device
    order = sorted(range(len(encoded_list)), key=lambda i: len(encoded_list[i]))
    out = [0.0] * len(encoded_list)
    for s in range(0, len(order), max(1, batch_size)):
        idx = order[s : s + batch_size]
        batch = collate_separate([encoded_list[i] for i in idx], fmt.pad_id)
        r = scorer(**{k: v.to(device) for k, v in batch.items()})
        for i, v in zip(idx, r.tolist()):
            out[i] = float(v)
    return out
