"""Model averaging: the tensor mean by hand, the folder command, and snapshot averaging inside SFT."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from core import checkpoints, models
from core.average import AverageError, average_tensors
from core.config import ConfigError, LoraConfig, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_average_tensors_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "step": torch.tensor([7])}
    b = {"w": torch.tensor([3.0, 6.0]), "step": torch.tensor([9])}
    out = average_tensors([a, b])
    assert out["w"].tolist() == [2.0, 4.0]
    assert out["step"].tolist() == [7]  # integer buffers are copied from the first model, not averaged
    assert average_tensors([a, b], [0.25, 0.75])["w"].tolist() == [2.5, 5.0]
    # bf16 weights are accumulated in float32 and cast back
    h = average_tensors([{"w": torch.tensor([1.0], dtype=torch.bfloat16)}, {"w": torch.tensor([2.0], dtype=torch.bfloat16)}])
    assert h["w"].dtype == torch.bfloat16 and h["w"].item() == 1.5
    with pytest.raises(AverageError, match="shapes differ"):
        average_tensors([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}])
    with pytest.raises(AverageError, match="other parameter names"):
        average_tensors([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}])


def _save(model, fmt, d: Path) -> Path:
    model.save_pretrained(d, safe_serialization=True)
    fmt.tokenizer.save_pretrained(d)
    return d


def test_average_models_command(tmp_path, tiny_fmt, tiny_lm):
    a = _save(tiny_lm(tiny_fmt, seed=1), tiny_fmt, tmp_path / "a")
    b = _save(tiny_lm(tiny_fmt, seed=2), tiny_fmt, tmp_path / "b")
    res = subprocess.run([sys.executable, "-m", "core.average", str(tmp_path / "avg"), str(a), str(b)],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    avg = load_file(tmp_path / "avg" / "model.safetensors")
    assert set(avg) == set(wa)
    for k in wa:
        torch.testing.assert_close(avg[k], (wa[k] + wb[k]) / 2)
    assert (tmp_path / "avg" / "tokenizer.json").exists() and (tmp_path / "avg" / "config.json").exists()
    models.load_causal_lm(tmp_path / "avg")  # loads as a model

    # a model of another shape: one clear line, no traceback, nothing written
    other = tiny_lm(tiny_fmt)
    other.config.num_hidden_layers = 1
    c = _save(type(other)(other.config), tiny_fmt, tmp_path / "c")
    res = subprocess.run([sys.executable, "-m", "core.average", str(tmp_path / "bad"), str(a), str(c)],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ") and str(c) in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_snapshot_steps():
    cfg = SimpleNamespace(average_last=3, average_every=10, lora=None)
    assert checkpoints.snapshot_steps(100, cfg) == [80, 90, 100]
    assert checkpoints.snapshot_steps(100, SimpleNamespace(average_last=2, average_every=0, lora=None)) == [75, 100]
    assert checkpoints.snapshot_steps(3, SimpleNamespace(average_last=5, average_every=1, lora=None)) == [1, 2, 3]
    assert checkpoints.snapshot_steps(100, SimpleNamespace(average_last=0, average_every=0, lora=None)) == []
    with pytest.raises(ConfigError, match="LoRA"):  # refused when the recipe loads, before any stage runs
        load_recipe(None, ["sft.average_last=2", "sft.lora={}"])


def test_sft_average_last_is_the_mean_of_its_snapshots(tmp_path, tiny_fmt, monkeypatch, tiny_lm):
    """average_last=2, average_every=2 over 4 steps: the saved model is mean(weights at step 2, step 4), and
    the step-4 weights are those of the same run without averaging."""
    from alignment import sft
    from core import checkpoints
    from data.io import write_jsonl
    from data.default_task import generate

    base = _save(tiny_lm(tiny_fmt), tiny_fmt, tmp_path / "base")
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, generate(seed=1, n_sft=16, n_preference=0, n_eval_preference=0, n_eval_prompts=0, n_sampling_prompts=0)["sft"])
    common = ["sft.lr=1e-2", "sft.max_steps=4", "sft.batch_size=4", "sft.report_to=none", "sft.warmup_ratio=0"]

    seen = {}
    real = checkpoints.average_models

    def spy(dirs, out, weights=None):
        seen["inputs"] = [load_file(Path(d) / "model.safetensors") for d in dirs]
        seen["dirs"] = [Path(d).name for d in dirs]
        return real(dirs, out, weights)

    monkeypatch.setattr(checkpoints, "average_models", spy)
    m = sft.main(load_recipe(None, common + ["sft.average_last=2", "sft.average_every=2"]), tmp_path / "avg", {"model": base, "data": data})
    assert m["averaged_steps"] == [2, 4] and seen["dirs"] == ["step-2", "model"]
    assert not (tmp_path / "avg" / "snapshots").exists()
    averaged = load_file(tmp_path / "avg" / "model" / "model.safetensors")
    sft.main(load_recipe(None, common), tmp_path / "plain", {"model": base, "data": data})
    plain = load_file(tmp_path / "plain" / "model" / "model.safetensors")
    s2, s4 = seen["inputs"]
    for k in plain:
        torch.testing.assert_close(s4[k], plain[k])  # the snapshot run is the same run
        torch.testing.assert_close(averaged[k], (s2[k] + s4[k]) / 2)
    assert any(not torch.equal(s2[k], s4[k]) for k in plain)
