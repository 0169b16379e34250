"""Models: loading (safetensors only, no remote code; optionally quantized to nf4, QLoRA), LoRA, float32 master
weights, the special-embedding fix, and saving (atomic, LoRA merged, in the loaded dtype; the adapters too).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import torch
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


def load_causal_lm(path: str | os.PathLike, dtype: str = "float32", dropout: float | None = 0.0,
                   quantization: str = "none", device=None):
    """A local HF causal LM, safetensors only, no remote code. `dropout` (model.dropout): every dropout
    probability of its config is set to it before the modules are built (None keeps the checkpoint's).
    `quantization` (model.quantization) nf4: its linear layers quantized as it loads, on `device` (quantized_load)."""
    require_safetensors(path)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype), use_safetensors=True, trust_remote_code=False,
                                                **dropout_overrides(path, dropout), **quantized_load(quantization, device))


# -- QLoRA: the frozen base in nf4 -------------------------------------------------------------------------
def quantized_load(quantization: str, device=None) -> dict:
    """from_pretrained's arguments for `model.quantization` ({} for none). nf4 is QLoRA's: bitsandbytes 4-bit
    NormalFloat with double quantization (the blocks' scales quantized too, ~0.4 bit a weight saved), bf16
    compute, and the packed 4-bit weights stored as bf16 elements, so that FSDP2 and ZeRO-3, which shard floating
    tensors only, shard them like the rest (Answer.AI's FSDP+QLoRA). Every linear layer is quantized except the
    LM head and a reward model's score head (transformers leaves the output layer and the last module alone).
    On a GPU the weights are quantized as they load onto `device` (the process's own GPU: a 70B base never
    passes through GPU memory in bf16); on a CPU, in CPU memory."""
    if quantization == "none":
        return {}
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    kwargs = {"quantization_config": config}
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cpu":
        if device.type == "cuda" and device.index is None:  # accelerate's prepare checks a 4-bit model's GPU index
            device = torch.device("cuda", torch.cuda.current_device())
        kwargs["device_map"] = {"": device}
    return kwargs


def quantized_layers(model) -> dict:
    """{module name: bitsandbytes Linear4bit} of `model` (a peft wrapper too; peft's LoRA layer around one has the
    same class name, hence the module check); empty for an unquantized model."""
    return {name: m for name, m in model.named_modules()
            if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes.")}


def prepare_quantized(model, gradient_checkpointing: bool = True):
    """A 4-bit model made ready for adapters, before get_peft_model: peft's prepare_model_for_kbit_training
    (every weight frozen; with `gradient_checkpointing`, activations recomputed layer by layer in backward,
    non-reentrant, which FSDP2, DDP and DeepSpeed all take), minus two of its side effects:
    - it casts every unquantized weight (embeddings, norms, LM head) to float32; they are frozen, the launcher's
      bf16 autocast runs their matmuls in bf16 whatever their dtype, Llama's RMSNorm computes in float32 itself
      and the log-probs are float32 (core/logps.py): float32 copies would only cost memory (2.1 GB on
      Llama-3.1-8B, 4.2 GB on 70B), so they go back to the loaded dtype;
    - on a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight in place the first time it runs in
      eval mode without gradients (DPO's reference pass), changing the frozen base's bytes and layout: off."""
    from peft import prepare_model_for_kbit_training

    loaded = getattr(model.config, "dtype", None)
    loaded = getattr(torch, loaded) if isinstance(loaded, str) else loaded
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    if isinstance(loaded, torch.dtype) and loaded != torch.float32:
        for p in model.parameters():
            if p.dtype == torch.float32 and type(p).__name__ != "Params4bit":
                p.data = p.data.to(loaded)
    for layer in quantized_layers(model).values():
        layer.support_avx512bf16_for_cpu = False
    return model


QUANT_STATE_KEYS = re.compile(r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+)$")


@torch.no_grad()
def dequantized_state(state: dict, model) -> dict:
    """`state` (a 4-bit model's full state dict, gathered or not) with every 4-bit weight replaced by its
    dequantized matrix (bitsandbytes.functional.dequantize_4bit) in the compute dtype, on the CPU, and the
    quant-state entries dropped: the base that the adapters were trained on, in a form any loader reads.

    The scales come from the live module (`weight.quant_state`, or the module's copy where FSDP2 or ZeRO-3
    replaced the parameter object); each matrix is dequantized on their device, one at a time, and moved to
    the CPU: a 70B base in bf16 (140 GB) never sits in GPU memory."""
    import bitsandbytes.functional as bnb_f

    out = {k: v for k, v in state.items() if not QUANT_STATE_KEYS.search(k)}
    for name, layer in quantized_layers(model).items():
        qs = getattr(layer.weight, "quant_state", None) or layer.quant_state
        key = f"{name}.weight"
        packed = out.get(key, layer.weight.data)
        out[key] = bnb_f.dequantize_4bit(packed.to(qs.absmax.device), qs).to(qs.dtype).cpu()
    return out


def drop_quant_state(models, weights, output_dir) -> None:
    """accelerate save_state pre-hook (core.checkpoints registers it): the quant-state entries bitsandbytes adds
    to a 4-bit model's state dict (absmax, quant_map, ...) are left out of checkpoints. Loading a checkpoint
    back (load_state_dict, strict) would refuse them as unexpected keys; the packed weights it keeps load back
    into the 4-bit parameters byte for byte, and their scales are the ones loading the input model gave."""
    for state in weights:
        for key in [k for k in state if QUANT_STATE_KEYS.search(k)]:
            del state[key]


def speedups_problem(cfg, device, section: str) -> str | None:
    """Why a stage's compute options (its config section `section`) cannot run on `device`, in one line (None: they can)."""
    if cfg.attention == "flex" and device.type != "cuda":
        return (f"{section}.attention: flex trains on CUDA only (FlexAttention has no backward on {device.type}); "
                "use attention: sdpa")
    if cfg.liger:
        if device.type != "cuda":
            return f"{section}.liger: Liger's kernels are Triton kernels for CUDA; this stage runs on {device.type}"
        if importlib.util.find_spec("liger_kernel") is None:
            return f"{section}.liger: liger-kernel is not installed (pip install liger-kernel)"
    return None


def speedups(model, cfg, section: str, device) -> dict:
    """The compute options of a training stage's config, on a model just loaded (before LoRA wraps it); returns
    what was applied, for the stage's metrics.

    - attention flex: transformers' flex_attention implementation; packed and prefix-shared rows then get a
      FlexAttention BlockMask (core/packing.py), plain rows the mask transformers builds. Exact: the same rule.
    - liger: Liger's Triton RMSNorm, SwiGLU and RoPE kernels patched into this model's modules (and RoPE into
      transformers' Llama module: every Llama model of the process). Not its fused linear cross-entropy:
      core/logps.py already runs the LM head only at the trained positions, and DPO needs per-sequence sums.
    - compile: torch.compile of each decoder layer (the layers are the same code: one compiled graph, reused),
      dynamic in the sequence length so that every batch shape does not recompile."""
    applied = {"attention": cfg.attention, "liger": False, "compile": False}
    if why := speedups_problem(cfg, torch.device(device), section):  # where it will train (it may load on the CPU)
        from core.config import ConfigError

        raise ConfigError(why)
    if cfg.attention == "flex":
        model.set_attn_implementation("flex_attention")
    if cfg.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=model)
        applied["liger"] = True
    if cfg.compile:
        for layer in getattr(model, model.base_model_prefix).layers:
            layer.compile(dynamic=True)
        applied["compile"] = True
    return applied


def apply_lora(model, lora_cfg, task_type: str = "CAUSAL_LM", gradient_checkpointing: bool | None = None):
    """Wrap `model` with peft LoRA adapters when the stage config asks for them.

    task_type: CAUSAL_LM for policies; SEQ_CLS for the reward model (its score head stays fully trained).
    A 4-bit model (model.quantization: nf4) is prepared first (prepare_quantized), with gradient checkpointing
    unless `gradient_checkpointing` is False: QLoRA's point is memory, and activations are most of it."""
    if lora_cfg is None:
        return model
    # peft imported where it is used: it imports bitsandbytes when installed, after data.doctor (imported above)
    # has quieted its import-time warning
    from peft import LoraConfig, get_peft_model

    if quantized_layers(model):
        model = prepare_quantized(model, gradient_checkpointing is not False)
    cfg = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                     target_modules=list(lora_cfg.target_modules), task_type=task_type)
    return get_peft_model(model, cfg)


def gradient_checkpointing(model, on: bool | None) -> None:
    """Activation checkpointing (recipe `gradient_checkpointing`): each decoder layer keeps only its input
    and recomputes the rest in the backward, for about a third more compute; the memory of activations goes
    from every layer's intermediates to one layer's. Non-reentrant (use_reentrant=False): it works with
    frozen inputs, DDP's no_sync and ZeRO-3. A peft model (LoRA) also gets enable_input_require_grads, as
    peft asks for checkpointing with a frozen embedding. Training mode only: the reference and eval passes
    run as before. `model` may be an HF model or its peft wrapper. None (the recipe's default) leaves the
    model as it is: off, or on where apply_lora prepared a 4-bit base (QLoRA)."""
    if not on:
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "peft_config"):
        model.enable_input_require_grads()


def fp32_master_weights(model, accelerator, master_weights: str = "float32") -> int:
    """Keep the trainable weights in float32 when the model was loaded in bf16/fp16; returns how many
    tensors were upcast. The launcher's mixed precision (`mixed_precision: bf16`) still runs the matmuls in
    bf16. Without this, AdamW updates of ~lr (1e-5) on weights of ~1e-2 fall below bfloat16's 8-bit
    mantissa and are rounded away: measured on 2 H200s, DPO under DDP with bf16 weights ended at loss 0.88,
    margin 0.15, where ZeRO-2/3 and FSDP2 (float32 masters) reached 0.60, margin 1.24. DeepSpeed keeps its
    own float32 master copy (and casts the module to bf16): left alone there. LoRA: only the adapters
    (and a trained score head) are upcast; the frozen base stays in its dtype. Saving writes the loaded dtype.

    `master_weights: bf16_kahan` (the stage's key): nothing is upcast, returns 0. The weights stay bf16 and
    core.optim.KahanAdamW keeps each weight's rounding error in a bf16 compensation buffer, added back at the
    next update, which does the float32 masters' job (small updates accumulate) in 10 bytes a parameter
    instead of 16."""
    if master_weights == "bf16_kahan" or accelerator.distributed_type.name == "DEEPSPEED":
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


def save_model(model, tokenizer, out_dir: str | os.PathLike, accelerator=None, adapter_dir: str | os.PathLike | None = None) -> None:
    """Save an HF model (safetensors; LoRA merged) and its tokenizer atomically: to a temp dir, then rename.
    With LoRA and `adapter_dir`, the adapters alone too (peft's adapter_model.safetensors + adapter_config.json).

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
            _write_model(model, tokenizer, out_dir, state, adapter_dir)
        accelerator.wait_for_everyone()
        return
    _write_model(model, tokenizer, out_dir, None, adapter_dir)


def _prepared_holding(accelerator, model) -> tuple[object, str]:
    """(the prepared model that is or holds `model`, the key prefix of `model` in its state dict)."""
    for prepared in accelerator._models:
        if prepared is model:
            return prepared, ""
        for name, mod in accelerator.unwrap_model(prepared).named_modules():
            if mod is model:
                return prepared, f"{name}." if name else ""
    return model, ""


def _write_model(model, tokenizer, out_dir: Path, state: dict | None, adapter_dir: Path | None = None) -> None:
    if hasattr(model, "peft_config"):  # LoRA: merged into the base weights, from the (gathered) state dict
        state = state if state is not None else model.state_dict()
        if adapter_dir is not None:
            _write_adapter(model, state, Path(adapter_dir))
        if quantized_layers(model):  # QLoRA: merged into the dequantized 4-bit base, saved as a plain model
            state = dequantized_state(state, model)
        state = merge_lora_state(state, model)
        model = unquantized_twin(model.get_base_model())
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


def unquantized_twin(model):
    """`model` itself when it is not quantized; else the same architecture without its quantization config, on
    the meta device (no memory), for save_pretrained to write a dequantized state dict as a plain model that
    vLLM and the next stage load in `model.dtype` (a quantization_config left in config.json would make every
    loader quantize again, or expect 4-bit weights)."""
    if not quantized_layers(model):
        return model
    config = copy.deepcopy(model.config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    with torch.device("meta"):
        twin = type(model)(config)
    if getattr(model, "generation_config", None) is not None:  # a causal LM's (stop tokens); a reward model has none
        twin.generation_config = copy.deepcopy(model.generation_config)
    return twin


def _write_adapter(peft_model, state: dict, adapter_dir: Path) -> None:
    """The adapters (and a reward model's trained score head) as peft saves them, atomically, from the (gathered)
    state dict: PeftModel.from_pretrained(base, adapter_dir) loads them onto the stage's input model (quantized
    as the stage had it, for the same function)."""
    tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    os.replace(tmp, adapter_dir)


@torch.no_grad()
def merge_lora_state(state: dict, peft_model) -> dict:
    """The base model's state dict with every LoRA adapter merged, W + (B @ A) * scaling, from a peft model's
    full state dict (keys `base_model.model.<name>.base_layer.weight`, `.lora_A.<adapter>.weight`, ...).

    Works on a gathered ZeRO-3 / FSDP state dict, where peft's in-place merge_and_unload cannot (the modules
    hold shards). Matches merge_and_unload (tested). modules_to_save copies (the reward head) replace their
    originals. The merged matrices are returned on the CPU."""
    from peft.tuners.lora import LoraLayer

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
            # merged on the adapter's device, then moved to the CPU one matrix at a time (save_pretrained writes from
            # there anyway): kept on the GPU, they held a second copy of the base (an 8B LoRA DPO run on an H200 peaked
            # at 29.0 GiB, most likely while saving, against its training loop's 20.6)
            merged = w.to(delta.device).float() + (delta.T if mod.fan_in_fan_out else delta)
            state[f"{name}.base_layer.weight"] = merged.to(w.dtype).cpu()
    out = {}
    for k, v in state.items():
        if ".original_module." in k and k.replace(".original_module.", f".modules_to_save.{adapter}.") in state:
            continue
        k = k.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", ".")
        out[k.replace(".original_module.", ".")] = v
    return out

