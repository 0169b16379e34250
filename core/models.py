"""Models: loading (safetensors only, no remote code), LoRA, float32 master weights, the special-embedding
fix, and saving (atomic, LoRA merged, in the loaded dtype).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from core.distributed import gathered
from data.doctor import dropout_overrides
from data.embeddings import reset_untrained_rows


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class ModelFolderError(FileNotFoundError):
    """A model folder that cannot be loaded as given (missing, no config, no safetensors weights). A
    FileNotFoundError, so that the pipeline and the CLIs print it as one `error:` line (exit code 2)."""


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def require_safetensors(path: str | os.PathLike, key: str | None = None) -> Path:
    """Check that `path` is a model folder every loader can read: config.json and *.safetensors weights.

    The one check before every model load (load_causal_lm, reward.model, the sampling engines, prepare), so
    that a folder with only pytorch_model.bin is refused with why and how to convert it, not with the
    loader's traceback. `.bin` / `.pt` files are pickles: loading one can run code, so they are never read;
    converting is left to the user, on a machine where the model is trusted. `key` names the recipe key."""
    p = Path(path)
    where = f"{key} {p}" if key else str(p)
    if not p.is_dir():
        raise ModelFolderError(f"{where}: no such model folder")
    if not (p / "config.json").is_file():
        raise ModelFolderError(f"{where}: no config.json: not a Hugging Face model folder")
    if any(p.glob("*.safetensors")):
        return p
    pickles = sorted(f.name for pattern in PICKLE_WEIGHTS for f in p.glob(pattern) if not f.name.startswith("training_args"))
    if not pickles:
        raise ModelFolderError(f"{where}: no model weights (*.safetensors)")
    try:  # the class that keeps every weight (a reward model's score head too)
        arch = str((json.loads((p / "config.json").read_text()).get("architectures") or [""])[0])
    except (OSError, ValueError, AttributeError, IndexError):
        arch = ""
    arch = arch if re.fullmatch(r"[A-Za-z_]\w*", arch) else "AutoModelForCausalLM"  # printed for pasting: a name only
    raise ModelFolderError(
        f"{where}: only pickle weights ({', '.join(pickles[:3])}{', ...' if len(pickles) > 3 else ''}); weights are "
        "loaded as safetensors only, since loading a pickle can run code. Convert them once, where the model is "
        f"trusted: python -c \"from transformers import {arch} as M, AutoTokenizer as T; M.from_pretrained('{p}')"
        f".save_pretrained('{p}-safetensors', safe_serialization=True); T.from_pretrained('{p}')"
        f".save_pretrained('{p}-safetensors')\" and give that folder instead")


def load_causal_lm(path: str | os.PathLike, dtype: str = "float32", dropout: float | None = 0.0):
    """A local HF causal LM, safetensors only, no remote code. `dropout` (model.dropout): every dropout
    probability of its config is set to it before the modules are built (None keeps the checkpoint's)."""
    require_safetensors(path)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype), use_safetensors=True, trust_remote_code=False,
                                                **dropout_overrides(path, dropout))


def apply_lora(model, lora_cfg, task_type: str = "CAUSAL_LM"):
    """Wrap `model` with peft LoRA adapters when the stage config asks for them.

    task_type: CAUSAL_LM for policies; SEQ_CLS for the reward model (its score head stays fully trained)."""
    if lora_cfg is None:
        return model
    cfg = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                     target_modules=list(lora_cfg.target_modules), task_type=task_type)
    return get_peft_model(model, cfg)


def fp32_master_weights(model, accelerator) -> int:
    """Keep the trainable weights in float32 when the model was loaded in bf16/fp16; returns how many
    tensors were upcast. The launcher's mixed precision (`mixed_precision: bf16`) still runs the matmuls in
    bf16. Without this, AdamW updates of ~lr (1e-5) on weights of ~1e-2 fall below bfloat16's 8-bit
    mantissa and are rounded away: measured on 2 H200s, DPO under DDP with bf16 weights ended at loss 0.88,
    margin 0.15, where ZeRO-2/3 and FSDP2 (float32 masters) reached 0.60, margin 1.24. DeepSpeed keeps its
    own float32 master copy (and casts the module to bf16): left alone there. LoRA: only the adapters
    (and a trained score head) are upcast; the frozen base stays in its dtype. Saving writes the loaded dtype."""
    if accelerator.distributed_type.name == "DEEPSPEED":
        return 0
    n = 0
    for p in model.parameters():  # tied embeddings are one Parameter: upcast once, still tied
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


def init_special_embeddings(model, token_ids: list[int]) -> list[int]:
    """Set untrained rows (norm far below the typical row) of the chat-format tokens to the mean embedding:
    data.embeddings.reset_untrained_rows (the doctor's check and --fix are the same function), with ZeRO-3's
    partitioned rows gathered. Returns the ids that were reset."""
    return reset_untrained_rows(model, token_ids, gather=gathered)


def save_model(model, tokenizer, out_dir: str | os.PathLike, accelerator=None) -> None:
    """Save an HF model (safetensors; LoRA merged) and its tokenizer atomically: to a temp dir, then rename.

    With `accelerator`, every process must call it: the full state dict is gathered from the prepared model
    that holds `model` (DDP, DeepSpeed ZeRO-2/3 with stage3_gather_16bit_weights_on_model_save, FSDP2; `model`
    may be the prepared model itself or a module inside it, e.g. the reward scorer's HF model), the main
    process alone writes, and all wait for the write."""
    out_dir = Path(out_dir)
    state = None
    if accelerator is not None:
        accelerator.wait_for_everyone()
        prepared, prefix = _prepared_holding(accelerator, model)
        state = accelerator.get_state_dict(prepared)  # a collective under ZeRO-3 / FSDP
        model = accelerator.unwrap_model(model)
        if accelerator.is_main_process:
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            _write_model(model, tokenizer, out_dir, state)
        accelerator.wait_for_everyone()
        return
    _write_model(model, tokenizer, out_dir, None)


def _prepared_holding(accelerator, model) -> tuple[object, str]:
    """(the prepared model that is or holds `model`, the key prefix of `model` in its state dict)."""
    for prepared in accelerator._models:
        if prepared is model:
            return prepared, ""
        for name, mod in accelerator.unwrap_model(prepared).named_modules():
            if mod is model:
                return prepared, f"{name}." if name else ""
    return model, ""


def _write_model(model, tokenizer, out_dir: Path, state: dict | None) -> None:
    if hasattr(model, "peft_config"):  # LoRA: merged into the base weights, from the (gathered) state dict
        state = merge_lora_state(state if state is not None else model.state_dict(), model)
        model = model.get_base_model()
    loaded = getattr(model.config, "dtype", None)  # the dtype it was loaded in (float32 masters are saved in it)
    loaded = getattr(torch, loaded) if isinstance(loaded, str) else loaded
    cast = loaded if isinstance(loaded, torch.dtype) and loaded != torch.float32 else None
    if cast is not None:
        state = {k: v.to(cast) if v.is_floating_point() else v
                 for k, v in (state if state is not None else model.state_dict()).items()}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state)
    if cast is not None:  # save_pretrained wrote the in-memory dtype
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["dtype"] = str(cast).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


@torch.no_grad()
def merge_lora_state(state: dict, peft_model) -> dict:
    """The base model's state dict with every LoRA adapter merged, W + (B @ A) * scaling, from a peft model's
    full state dict (keys `base_model.model.<name>.base_layer.weight`, `.lora_A.<adapter>.weight`, ...).

    Works on a gathered ZeRO-3 / FSDP state dict, where peft's in-place merge_and_unload cannot (the modules
    hold shards). Matches merge_and_unload (tested). modules_to_save copies (the reward head) replace their
    originals."""
    adapter = peft_model.active_adapter
    if getattr(peft_model.peft_config[adapter], "use_dora", False):
        raise ValueError("saving a DoRA model is not supported; use plain LoRA")
    state = dict(state)
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
            a = state.pop(f"{name}.lora_A.{adapter}.weight").float()
            b = state.pop(f"{name}.lora_B.{adapter}.weight").float()
            w = state[f"{name}.base_layer.weight"]
            delta = (b @ a) * mod.scaling[adapter]
            state[f"{name}.base_layer.weight"] = (w.float() + (delta.T if mod.fan_in_fan_out else delta).to(w.device)).to(w.dtype)
    out = {}
    for k, v in state.items():
        if ".original_module." in k and k.replace(".original_module.", f".modules_to_save.{adapter}.") in state:
            continue
        k = k.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", ".")
        out[k.replace(".original_module.", ".")] = v
    return out

