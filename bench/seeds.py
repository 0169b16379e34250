"""The default recipe over several seeds: does alignment improve the model on every one, on this machine?

    python bench/seeds.py --seeds 0 1 2 3 4                 # make seeds SEEDS="0 1 2 3 4"
    python bench/seeds.py --seeds 5 6 dpo.lr=5e-4           # recipe overrides apply to every seed

Each seed N runs the whole recipe into its own run folder (`runs/seedN/`: name=seedN seed=N task.seed=N,
so the task's data, the base model and every stage's randomness change with N), as one fresh process,
exactly as `make pipeline name=seedN seed=N task.seed=N` would; a folder already up to date is reused.
It prints one row per seed and the mean and standard deviation of each column, and writes
`bench/results/seeds-<date>-<machine>.json` (machine, versions, recipe, overrides, rows, summary, and
whether each seed passes the promised figures: DPO - SFT >= 0.10 gold and RM accuracy >= 0.90).

Figures are bit-identical on one machine for a seed; across processors the numerics (and with them a
sampled answer here and there) differ, which is why the promise is stated over seeds, not for one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.runs import package_versions, source  # noqa: E402
from data.io import write_json  # noqa: E402

# (column, where it is in report/metrics.json "stages", key)
COLUMNS = [("sft", "sft", "gold_score"), ("best_of_k", "sampling", "best_of_k_gold_score"),
           ("random_of_k", "sampling", "random_of_k_gold_score"), ("dpo", "dpo", "gold_score"),
           ("dpo_minus_sft", None, None), ("rm_accuracy", "reward", "rm_accuracy"),
           ("kl_to_reference", "dpo", "kl_to_reference"), ("dpo_stop_rate", "dpo", "stop_rate")]
PROMISE = {"dpo_minus_sft": 0.10, "rm_accuracy": 0.90}  # per seed, at least
MEAN_GAIN = 0.15  # DPO - SFT, mean over the seeds


def machine() -> dict:
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    except OSError:
        pass
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu or platform.processor(),
            "cores": os.cpu_count(), "python": platform.python_version()}


def machine_tag(m: dict) -> str:
    """cpu-x86_64-2c-intel-xeon: the processor's maker and family are in the name, since the figures depend on
    them (the same seed gives other figures on an AMD EPYC than on an Intel Xeon of the same core count)."""
    words = [re.sub(r"\(.*?\)|[^a-z0-9]", "", w.lower()) for w in m["cpu"].split()[:2]]
    return "-".join([f"cpu-{m['machine']}-{m['cores']}c", *[w for w in words if w]])


def run_seed(seed: int, recipe: str, overrides: list[str], output_dir: str) -> tuple[dict, float]:
    """Run the recipe for one seed (a fresh process, like `make pipeline`); returns (report, seconds)."""
    name = f"seed{seed}"
    cmd = [sys.executable, "-m", "pipeline.run", recipe, f"name={name}", f"seed={seed}", f"task.seed={seed}",
           f"output_dir={output_dir}", *overrides]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"seed {seed}: the pipeline failed (exit {res.returncode}): {' '.join(cmd)}")
    report = json.loads((Path(output_dir) / name / "report" / "metrics.json").read_text())
    return report, round(time.time() - t0, 1)


def row_of(seed: int, report: dict, seconds: float) -> dict:
    stages = report["stages"]
    row = {"seed": seed}
    for col, stage, key in COLUMNS:
        if stage is not None:
            row[col] = stages.get(stage, {}).get(key)
    if row.get("dpo") is not None and row.get("sft") is not None:
        row["dpo_minus_sft"] = round(row["dpo"] - row["sft"], 4)
    row["passes"] = all(row.get(k) is not None and row[k] >= v for k, v in PROMISE.items())
    row["seconds"] = seconds
    return row


def summarize(rows: list[dict]) -> dict:
    out = {}
    for col, _, _ in COLUMNS:
        vals = [r[col] for r in rows if r.get(col) is not None]
        if vals:
            out[col] = {"mean": round(statistics.fmean(vals), 4),
                        "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0,
                        "min": min(vals), "max": max(vals)}
    gain = out.get("dpo_minus_sft", {}).get("mean")
    out["all_pass"] = all(r["passes"] for r in rows) and gain is not None and gain >= MEAN_GAIN
    return out


def table(rows: list[dict], summary: dict) -> str:
    cols = [c for c, _, _ in COLUMNS]
    lines = ["seed  " + "  ".join(f"{c:>15s}" for c in cols) + "  passes"]
    cell = lambda v: f"{v:15.3f}" if isinstance(v, (int, float)) else f"{'n/a':>15s}"  # noqa: E731
    for r in rows:
        lines.append(f"{r['seed']:<4d}  " + "  ".join(cell(r.get(c)) for c in cols) + f"  {'yes' if r['passes'] else 'NO'}")
    lines.append("mean  " + "  ".join(cell(summary.get(c, {}).get("mean")) for c in cols))
    lines.append("std   " + "  ".join(cell(summary.get(c, {}).get("std")) for c in cols))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", default=["0", "1", "2", "3", "4"])
    ap.add_argument("--recipe", default="recipes/default.yaml")
    ap.add_argument("--output-dir", default="runs")
    ap.add_argument("--out", help="JSON path (default bench/results/seeds-<date>-<machine>.json)")
    ap.add_argument("overrides", nargs="*", help="key=value recipe overrides for every seed")
    args = ap.parse_intermixed_args(argv)
    # `--seeds 5 6 dpo.lr=5e-4`: --seeds takes the words that follow it; those with `=` are overrides
    args.overrides = [w for w in args.seeds if "=" in w] + args.overrides
    try:
        args.seeds = [int(w) for w in args.seeds if "=" not in w]
    except ValueError as e:
        ap.error(f"--seeds: {e}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    for seed in args.seeds:
        report, seconds = run_seed(seed, args.recipe, args.overrides, args.output_dir)
        rows.append(row_of(seed, report, seconds))
        print(f"seed {seed}: " + ", ".join(f"{k}={v}" for k, v in rows[-1].items() if k != "seed"), flush=True)
    summary = summarize(rows)
    print(table(rows, summary))
    m = machine()
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"seeds-{time.strftime('%Y-%m-%d')}-{machine_tag(m)}.json"
    write_json(out, {"benchmark": "seeds", "command": "python bench/seeds.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": m, "versions": package_versions(),
                     "source": source(), "recipe": args.recipe, "overrides": args.overrides, "promise": {**PROMISE, "mean_dpo_minus_sft": MEAN_GAIN},
                     "rows": rows, "summary": summary})
    print(f"seeds: {out}  ({'every seed passes' if summary['all_pass'] else 'NOT every seed passes'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
