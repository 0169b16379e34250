"""The default CPU pipeline's DPO stage with and without prefix sharing, side by side: is the shared layout
slower on the CPU, and does it train to the same figures?

    python bench/cpu_layouts.py                  # about 8 minutes on 2 cores (the pipeline once, then 6 DPO runs)
    python bench/cpu_layouts.py --repeats 5

Issue 13 made DPO feed each pair as one row, the prompt once and both responses after it (`dpo.prefix_sharing`,
on by default), where it fed two rows, the prompt in each (`prefix_sharing: false`, the plain path). On the
CPU the default recipe keeps SDPA with a dense mask and no packing, so this is the layout change the default
pipeline runs. The benchmark runs the default recipe once under the run name `layouts` (reused when up to
date), then reruns its DPO stage on the same SFT policy and sampled pairs, alternating plain and shared
(`python -m pipeline.run recipes/default.yaml --stage dpo --force name=layouts ...`, a fresh process each, as
`make dpo` runs it), the shared arm last so that the run folder ends as the default recipe leaves it. Each
run's `dpo/metrics.json` gives the stage's wall time, the training loop's steady tokens/s and the figures.
It writes `bench/results/cpu-layouts-<date>-<machine>.json` with the medians and the ratios shared / plain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from core.config import load_recipe  # noqa: E402
from core.runs import package_versions, source  # noqa: E402
from data.io import write_json  # noqa: E402
from seeds import machine, machine_tag  # noqa: E402

ARMS = {"plain": ["dpo.prefix_sharing=false"], "shared": []}  # the default recipe: prefix_sharing true
# dpo/metrics.json: how long, how fast, and what it trained to
KEYS = ("wall_seconds", "train_seconds", "steady_seconds", "throughput", "examples_per_s", "gold_score", "pass_rate",
        "stop_rate", "final_loss")


def run(cmd: list[str]) -> float:
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    if res.returncode != 0:
        raise SystemExit(f"failed (exit {res.returncode}): {' '.join(cmd)}")
    return round(time.time() - t0, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each arm, alternating (default 3)")
    ap.add_argument("--recipe", default="recipes/default.yaml")
    ap.add_argument("--out", help="JSON path (default bench/results/cpu-layouts-<date>-<machine>.json)")
    args = ap.parse_args(argv)

    base = [sys.executable, "-m", "pipeline.run", args.recipe, "name=layouts"]
    print("the default recipe under the run name `layouts` (reused when up to date) ...", flush=True)
    pipeline_seconds = run(base)
    recipe = load_recipe(args.recipe, ["name=layouts"])  # where the run lands: the recipe's output_dir
    metrics_file = ROOT / recipe.output_dir / recipe.name / "dpo" / "metrics.json"
    runs = {arm: [] for arm in ARMS}
    for i in range(args.repeats):
        for arm, overrides in ARMS.items():  # plain first, shared last: the folder ends as the default leaves it
            seconds = run([*base, "--stage", "dpo", "--force", *overrides])
            m = json.loads(metrics_file.read_text())
            runs[arm].append({"process_seconds": seconds, **{k: m.get(k) for k in KEYS}})
            print(f"{arm} {i + 1}/{args.repeats}: " + json.dumps(runs[arm][-1]), flush=True)

    def median(arm: str, key: str):
        vals = [r[key] for r in runs[arm] if r.get(key) is not None]
        return round(statistics.median(vals), 4) if vals else None

    medians = {arm: {k: median(arm, k) for k in ("process_seconds", *KEYS)} for arm in ARMS}
    ratios = {k: round(medians["shared"][k] / medians["plain"][k], 3)
              for k in ("process_seconds", "wall_seconds", "train_seconds", "steady_seconds", "examples_per_s")
              if medians["shared"][k] and medians["plain"][k]}
    for arm in ARMS:
        print(f"{arm:7s} " + ", ".join(f"{k}={v}" for k, v in medians[arm].items()))
    print("shared / plain: " + json.dumps(ratios))
    m = machine()
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"cpu-layouts-{time.strftime('%Y-%m-%d')}-{machine_tag(m)}.json"
    write_json(out, {"benchmark": "cpu_layouts", "issue": 13,
                     "command": "python bench/cpu_layouts.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": m, "versions": package_versions(), "source": source(),
                     "recipe": args.recipe, "arms": ARMS, "repeats": args.repeats, "pipeline_seconds": pipeline_seconds,
                     "notes": ["throughput: the DPO loop's real tokens per second over its steps after the warm-up (a "
                               "shared pair counts its prompt once: compare examples_per_s, pairs per second)",
                               "process_seconds: the whole `pipeline.run --stage dpo` process (interpreter, imports, the "
                               "stage's own evaluation); wall_seconds: the stage's own"],
                     "runs": runs, "medians": medians, "ratios": ratios})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
