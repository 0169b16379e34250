"""Run pipeline stages on GPUs, timed, and write bench/results/gpu-<date>-<kind>.json.

    python bench/gpu_run.py recipes/gpu-smoke.yaml --kind nvidia-h100-x1                  # every stage, one GPU
    python bench/gpu_run.py recipes/gpu-smoke.yaml --kind nvidia-h200-x2 --launcher zero3 --gpus 2 \\
        sampling.data_parallel=2                                  # every stage: ZeRO-3 x 2, two vLLM engines
    python bench/gpu_run.py recipes/gpu-smoke.yaml --kind nvidia-h200-x2 --launcher ddp --gpus 2 \\
        --stages dpo --append --label ddp                         # the same stage again, as entry "dpo:ddp"

Each stage runs as the Makefile runs it: the training stages (sft, reward, dpo) under
`accelerate launch --config_file recipes/accelerate/<launcher>.yaml --num_processes <gpus>`, prepare and
sample as one process (vLLM starts its own engines), each with --force so its figures are fresh.
Per stage the JSON holds: wall_seconds (the whole command: interpreter start, model loads, training,
saving, the stage's own evaluation), throughput from the stage's metrics.json (training stages: non-pad
tokens/s of the training loop over all processes; sample: generated tokens/s), peak_gpu_mem_gb (training
stages: torch.cuda.max_memory_allocated, the max over processes) and peak_gpu_mem_used_gb (nvidia-smi,
polled every 0.5 s, the max over GPUs, everything on the device: vLLM reserves gpu_memory_utilization of it).
If sampling leaves no pairs (an undertrained policy whose candidates are all cut off), DPO falls back to the
task's preference data and the JSON says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.runs import package_versions, source  # noqa: E402

TRAINING = ("sft", "reward", "dpo")


def smi(query: str) -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


class MemoryPoller:
    """The max of nvidia-smi's memory.used (MiB) per GPU while a stage runs."""

    def __init__(self):
        self.peak: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            used = [float(x) for x in smi("memory.used")]
            self.peak = [max(a, b) for a, b in zip(self.peak, used)] if self.peak else used
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def versions() -> dict:
    """core.runs.package_versions, with CUDA's and the NVIDIA driver's versions."""
    out = package_versions()
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except ImportError:
        pass
    drv = smi("driver_version")
    if drv:
        out["nvidia_driver"] = drv[0]
    return out


def stage_command(stage: str, recipe: str, launcher: str | None, gpus: int, overrides: list[str]) -> list[str]:
    args = ["-m", "pipeline.run", recipe, "--stage", stage, "--force", *overrides]
    if stage in TRAINING and launcher:
        accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
        cfg = ROOT / "recipes" / "accelerate" / f"{launcher}.yaml"
        return [accelerate, "launch", "--config_file", str(cfg), "--num_processes", str(gpus), *args]
    return [sys.executable, *args]


FIGURES = {  # per stage: what the result file keeps from its metrics.json besides speed and memory
    "prepare": ("parameters", "gold_score", "pretrain_loss_final"),
    "sft": ("steps", "first_loss", "final_loss", "gold_score", "stop_rate", "examples_per_s", "train_seconds"),
    "reward": ("steps", "pairs", "first_loss", "final_loss", "rm_accuracy", "examples_per_s", "train_seconds"),
    "sample": ("prompts", "k", "candidates", "generated_tokens", "candidates_per_s", "pairs", "best_of_k_gold_score",
               "random_of_k_gold_score", "generation_seconds", "engines"),
    "dpo": ("steps", "first_loss", "final_loss", "rewards/accuracies", "rewards/margins", "gold_score",
            "examples_per_s", "train_seconds"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--kind", required=True, help="the machine kind, for the file name (e.g. nvidia-h100-x1)")
    ap.add_argument("--launcher", default=None, help="recipes/accelerate/<launcher>.yaml (default: the recipe's launch.launcher)")
    ap.add_argument("--gpus", type=int, default=None, help="processes of the training stages (default: the recipe's launch.gpus)")
    ap.add_argument("--stages", default="prepare,sft,reward,sample,dpo")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--append", action="store_true", help="add these stages to an existing result file of the same name")
    ap.add_argument("--label", default=None, help="key this call's entries '<stage>:<label>' (the same stage again under "
                    "another launcher or setting, appended to the same file)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)

    from core.config import load_recipe
    from core.runs import stage_dir
    from data.io import read_json, write_json

    recipe = load_recipe(args.recipe, args.overrides)
    launcher = args.launcher or recipe.launch.launcher
    gpus = args.gpus or recipe.launch.gpus
    names = smi("name,memory.total")
    date = time.strftime("%Y-%m-%d")
    result = {
        "benchmark": "gpu-pipeline", "date": date, "kind": args.kind,
        "device": names[0].split(",")[0].strip() if names else "no GPU",
        "gpus": gpus, "gpus_on_host": len(names),
        "gpu_memory_gb": round(float(names[0].split(",")[1]) / 1024, 1) if names else None,
        "launcher": launcher, "launcher_config": f"recipes/accelerate/{launcher}.yaml" if launcher else None,
        "recipe": args.recipe, "overrides": args.overrides, "model_parameters": None,
        "versions": versions(), "source": source(), "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "stages": {},
    }
    out_file = Path(args.out) / f"gpu-{date}-{args.kind}.json"
    if args.append and out_file.exists():  # a run split over several commands (each has a time limit)
        earlier = read_json(out_file)
        result["stages"] = earlier["stages"]
        result.update({k: earlier.get(k) for k in ("model_parameters", "launcher", "launcher_config", "gpus", "overrides")})
    logs = Path(recipe.output_dir) / recipe.name / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    overrides = list(args.overrides)
    ok = True
    for stage in args.stages.split(","):
        extra = []
        sampled = [v for k, v in result["stages"].items() if k.split(":")[0] == "sample"]
        if stage == "dpo" and recipe.dpo.data == "sampling" and sampled:
            if not sampled[-1].get("pairs"):  # recorded in the entry's note
                extra = ["dpo.data=preference"]
        if stage == "sample":  # fresh generation: --force reruns the stage, but it would resume finished shards
            shutil.rmtree(stage_dir(recipe, "sample") / "candidates", ignore_errors=True)
        cmd = stage_command(stage, args.recipe, launcher, gpus, overrides + extra)
        print(f"== {stage}: {' '.join(cmd)}", flush=True)
        log = logs / f"{stage}.log"
        t0 = time.perf_counter()
        with MemoryPoller() as mem, open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - t0
        entry = {"completed": rc == 0, "wall_seconds": round(wall, 1), "command": " ".join(cmd[cmd.index("-m"):] if "-m" in cmd else cmd),
                 "launcher": launcher if stage in TRAINING else None,
                 "processes": gpus if stage in TRAINING and launcher else 1,
                 "peak_gpu_mem_used_gb": round(max(mem.peak) / 1024, 2) if mem.peak else None}
        if extra:
            entry["note"] = "sampling gave no pairs: DPO on the task's preference data"
        mpath = stage_dir(recipe, stage) / "metrics.json"
        if rc == 0 and mpath.exists():
            m = read_json(mpath)
            if stage == "sample":
                entry.update(throughput=m.get("tokens_per_s"), throughput_unit="generated tokens/s")
            elif stage in TRAINING:
                entry.update(throughput=m.get("throughput"), throughput_unit=m.get("throughput_unit"),
                             peak_gpu_mem_gb=m.get("peak_gpu_mem_gb"))
            entry["stage_wall_seconds"] = m.get("wall_seconds")
            entry.update({k: m[k] for k in FIGURES.get(stage, ()) if k in m})
            if stage == "prepare":
                result["model_parameters"] = m.get("parameters")
        result["stages"][f"{stage}:{args.label}" if args.label else stage] = entry
        tail = log.read_text(errors="replace").splitlines()
        print(f"   {stage}: rc={rc} wall={wall:.1f}s " + json.dumps({k: v for k, v in entry.items() if k != "command"}), flush=True)
        if rc != 0:
            print("\n".join(tail[-60:]), flush=True)
            ok = False
            break
    result["all_completed"] = ok and all(s["completed"] for s in result["stages"].values())
    write_json(out_file, result)
    print(f"wrote {out_file}")
    return 0 if result["all_completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
