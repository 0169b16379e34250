"""Benchmark: Llama 3's one-row reward layout against separate rows, forward + backward, side by side.

    .venv/bin/python bench/reward_one_row.py                    # the default recipe's tiny model, default task
    .venv/bin/python bench/reward_one_row.py --model runs/default/sft/model --batch-size 32 --steps 10

Same model, same preference rows, same batches, in both layouts. Per layout: pairs/s (and rows, tokens and
padded tokens per step) over `--steps` timed steps after `--warmup`, and peak memory:
- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, in one process;
- CPU: the growth of the process's peak RSS (resource.getrusage ru_maxrss) from after loading to the end
  of the steps, each layout in a fresh subprocess (peak RSS never goes down, so one process cannot measure
  two layouts). It includes allocator slack; the ratio is what to read.
Also checks that both layouts give the same rewards (max |diff|). Results: bench/results/reward-one-row-
<date>-<machine>.json with machine, versions, date and the ratios one_row / separate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.runs import package_versions, source  # noqa: E402


def ensure_model(path: str | None, work: Path) -> Path:
    """The given model folder, else the default recipe's prepared tiny model, else a fresh one in `work`."""
    if path:
        return Path(path)
    prepared = ROOT / "runs" / "default" / "prepare" / "model"
    if (prepared / "model.safetensors").exists():
        return prepared
    from core.config import load_recipe
    from data import default_task
    from data.tiny import make_model, train_tokenizer

    recipe = load_recipe(ROOT / "recipes" / "default.yaml")
    out = work / "tiny"
    if not (out / "model.safetensors").exists():
        sets = default_task.generate(0, 300, 300, 10, 10, 10)
        fmt = train_tokenizer(default_task.corpus(sets), out, recipe.model.vocab_size)
        make_model(fmt, out, recipe.model, seed=0)
    return out


def batches(fmt, n_rows: int, batch_size: int, seed: int):
    from data import default_task
    from reward.train import build_examples

    sets = default_task.generate(seed, 0, n_rows, 0, 0, 0)
    ex = build_examples(sets["preference"], fmt)
    return [ex[i : i + batch_size] for i in range(0, len(ex) - batch_size + 1, batch_size)]


def run_layout(args, one_row: bool) -> dict:
    """Time forward + backward of `args.steps` batches in one layout; returns figures and the rewards."""
    import torch

    from data.chat_format import load_tokenizer
    from reward.model import RewardScorer, init_reward_model
    from reward.train import MODEL_KEYS, collate_preferences
    from reward.loss import bradley_terry_loss_sum

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fmt = load_tokenizer(args.model)
    model, _ = init_reward_model(args.model, fmt.pad_id, args.dtype, attn_implementation=args.attn, seed=0)
    scorer = RewardScorer(model).to(device).train()
    for mod in scorer.modules():  # dropout off: the rewards of both layouts must be comparable
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    dtype = next(scorer.parameters()).dtype
    data = batches(fmt, args.rows, args.batch_size, args.seed)[: args.warmup + args.steps]
    prepared = [collate_preferences(b, fmt.pad_id, one_row, dtype, random.Random(i)) for i, b in enumerate(data)]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    pairs = rows = tokens = real = 0
    rewards = []
    t0 = None
    for i, mb in enumerate(prepared):
        if i == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        mb = {k: v.to(device) for k, v in mb.items()}
        r = scorer(**{k: mb[k] for k in MODEL_KEYS})
        loss = bradley_terry_loss_sum(r[mb["better"]], r[mb["worse"]]) / mb["better"].numel()
        loss.backward()
        scorer.zero_grad(set_to_none=True)
        rewards += r.detach().float().cpu().tolist()
        if i >= args.warmup:
            pairs += int(mb["better"].numel())
            rows += int(mb["input_ids"].shape[0])
            tokens += int(mb["input_ids"].numel())
            real += int((mb["input_ids"] != fmt.pad_id).sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    out = {
        "pairs_per_s": round(pairs / secs, 2),
        "seconds": round(secs, 3),
        "steps": args.steps,
        "pairs": pairs,
        "rows_per_step": rows / args.steps,
        "tokens_per_step_padded": tokens / args.steps,
        "tokens_per_step_real": real / args.steps,
    }
    if device.type == "cuda":
        out["peak_memory_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)
        out["memory_method"] = "torch.cuda.max_memory_allocated - memory_allocated before the steps"
    else:
        out["peak_memory_mib"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 2)
        out["memory_method"] = "ru_maxrss growth from after loading to after the steps, fresh process per layout"
    out["_rewards"] = rewards
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="causal LM or reward model folder (default: the recipe's tiny model)")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--batch-size", type=int, default=32, help="preference rows per step")
    ap.add_argument("--rows", type=int, default=512, help="preference rows generated (default task)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--machine", help="machine name for the results file (default: cpu-<arch>-<cores>c or the GPU's name)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--_layout", choices=["one_row", "separate"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._layout:  # a child process: one layout, JSON on stdout
        print(json.dumps(run_layout(args, args._layout == "one_row")))
        return 0

    args.model = str(ensure_model(args.model, Path("/tmp") / "reward_one_row_bench"))
    results = {}
    for layout in ("one_row", "separate"):
        if args.device == "cpu":
            cmd = [sys.executable, __file__, "--_layout", layout] + [a for a in sys.argv[1:]] + ["--model", args.model]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            results[layout] = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            results[layout] = run_layout(args, layout == "one_row")
        print(f"{layout:9s} {results[layout]['pairs_per_s']:9.1f} pairs/s  peak +{results[layout]['peak_memory_mib']:.1f} MiB  "
              f"{results[layout]['tokens_per_step_padded']:.0f} tokens/step")
    a, b = results["one_row"].pop("_rewards"), results["separate"].pop("_rewards")
    diff = max(abs(x - y) for x, y in zip(a, b))
    one, sep = results["one_row"], results["separate"]
    ratios = {
        "pairs_per_s_one_row_over_separate": round(one["pairs_per_s"] / sep["pairs_per_s"], 3),
        "peak_memory_one_row_over_separate": round(one["peak_memory_mib"] / sep["peak_memory_mib"], 3) if sep["peak_memory_mib"] > 0 else None,
        "padded_tokens_one_row_over_separate": round(one["tokens_per_step_padded"] / sep["tokens_per_step_padded"], 3),
        "real_tokens_one_row_over_separate": round(one["tokens_per_step_real"] / sep["tokens_per_step_real"], 3),
    }
    import torch

    now = datetime.datetime.now(datetime.timezone.utc)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else (platform.processor() or platform.machine())
    machine = args.machine or (f"cpu-{platform.machine()}-{os.cpu_count()}c" if args.device == "cpu"
                                else device_name.replace(" ", "-").lower())
    report = {
        "benchmark": "reward_one_row",
        "date": now.isoformat(timespec="seconds"),
        "machine": {"name": machine, "device": args.device, "device_name": device_name, "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version()},
        "versions": package_versions(), "source": source(),
        "config": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "out"},
        "what": "forward + backward of the Bradley-Terry loss, same model and batches; pairs/s over the timed steps",
        "one_row": one,
        "separate": sep,
        "ratios": ratios,
        "max_abs_reward_diff": diff,
    }
    out = Path(args.out) / f"reward-one-row-{now.date().isoformat()}-{machine}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(ratios), f"max |reward diff| {diff:.2e}")
    print(f"wrote {out}")
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
