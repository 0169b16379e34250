"""Bad input is one clear line (exit code 2), a bad record is counted, and no stage trains or samples on a
held-out eval prompt unseen (issue 15). Each test injects one fault and checks the line or the counts."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.config import load_recipe
from data.formats import DataError, iter_file
from data.validate import EVAL_OVERLAP, UNSCORED_COMPLETION, load_preferences, load_prompts, load_sft, prompt_keys
from tests.conftest import A, U

ROOT = Path(__file__).resolve().parents[1]


def one_line(text: str) -> str:
    """The single `error:` line a user sees; fails if there is a traceback or more."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in text, text
    return lines[0]


def write_jsonl(path: Path, recs: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return path


def sft_rec(q: str, a: str = "moo") -> dict:
    return {"messages": [U(q), A(a)]}


QUESTIONS = ["Maria asks: what sound does a cow make?", "Omar wonders: what color is a banana?",
             "Lena wants to know: what is the opposite of hot?"]


# -- 1. a .parquet file that is really CSV ---------------------------------------------------------------
def test_parquet_that_is_csv_is_one_line_naming_the_file(tmp_path):
    p = tmp_path / "prefs.parquet"
    p.write_text("prompt,chosen,rejected\nhi,hello,go away\n")
    with pytest.raises(DataError) as e:
        load_preferences(p, None)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and "not a Parquet file" in msg and "CSV" in msg, msg
    j = tmp_path / "x.parquet"
    j.write_text('{"prompt": "hi"}\n')
    with pytest.raises(DataError, match=r"not a Parquet file .*looks like JSON text"):
        list(iter_file(j))
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(b"PAR1" + b"\0" * 40)
    with pytest.raises(DataError, match="not a whole Parquet file"):
        list(iter_file(cut))


# -- 2. a model folder with only pytorch_model.bin ------------------------------------------------------
def bin_only(d: Path, arch: str = "LlamaForCausalLM") -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": "llama"}))
    (d / "pytorch_model.bin").write_bytes(b"a pickle: never opened")
    return d


def test_pickle_only_model_is_refused_by_every_loader(tmp_path):
    from core.models import ModelFolderError, load_causal_lm
    from reward.model import init_reward_model, load_reward_model

    d = bin_only(tmp_path / "m")
    for load in (lambda: load_causal_lm(d), lambda: init_reward_model(d, 0), lambda: load_reward_model(d)):
        with pytest.raises(ModelFolderError) as e:
            load()
        msg = str(e.value)
        assert isinstance(e.value, FileNotFoundError)  # the pipeline prints it as one line, exit code 2
        assert "\n" not in msg and "pytorch_model.bin" in msg and "safetensors only" in msg, msg
        assert "from transformers import LlamaForCausalLM as M" in msg and "safe_serialization=True" in msg
    with pytest.raises(ModelFolderError, match="no such model folder"):
        load_causal_lm(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ModelFolderError, match=r"no model weights \(\*.safetensors\)"):
        load_causal_lm(tmp_path / "empty")


def fake_model(d: Path, keys=("model.embed_tokens.weight",), tokenizer: Path | None = None, pad: int | None = 0) -> Path:
    """A model folder as the checks see it (config.json, safetensors headers, tokenizer): never loaded."""
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 512, "pad_token_id": pad}))
    save_file({k: torch.zeros(1) for k in keys}, str(d / "model.safetensors"))
    if tokenizer is not None:
        shutil.copy(tokenizer / "tokenizer.json", d / "tokenizer.json")
    return d


def sample_cli(tmp_path, policy, reward, prompts, capsys, *extra) -> str:
    from sampling.sample import cli

    rc = cli([str(ROOT / "recipes" / "default.yaml"), "--policy", str(policy), "--reward", str(reward),
              "--prompts", str(prompts), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    return err.strip().splitlines()[-1]


def test_sampling_checks_both_model_folders_before_any_engine(tmp_path, tiny_tokenizer_dir, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": QUESTIONS[0]}])
    good = fake_model(tmp_path / "policy", tokenizer=tiny_tokenizer_dir)
    line = sample_cli(tmp_path, bin_only(tmp_path / "pickle"), good, prompts, capsys)
    assert line.startswith("error: ") and "pytorch_model.bin" in line and "safetensors only" in line, line
    line = sample_cli(tmp_path, good, good, prompts, capsys)  # a policy given as the reward model
    assert "not a trained reward model" in line, line
    rm = fake_model(tmp_path / "rm", keys=("model.embed_tokens.weight", "score.weight"), pad=None)
    assert "no pad_token_id" in sample_cli(tmp_path, good, rm, prompts, capsys)


# -- 3. every sampling prompt rejected ------------------------------------------------------------------
@pytest.fixture
def sampling_folders(tmp_path, tiny_tokenizer_dir):
    policy = fake_model(tmp_path / "policy", tokenizer=tiny_tokenizer_dir)
    reward = fake_model(tmp_path / "reward", keys=("model.embed_tokens.weight", "score.weight"), tokenizer=tiny_tokenizer_dir)
    return policy, reward


def test_all_sampling_prompts_rejected_is_one_line_with_the_counts(tmp_path, sampling_folders, capsys):
    policy, reward = sampling_folders
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ['{"prompt": ', {"prompt": ""}, {"messages": [A("hi")]}])
    line = sample_cli(tmp_path, policy, reward, prompts, capsys)
    assert line.startswith(f"error: {prompts}: no prompts to sample: 3 records: 0 kept, 3 rejected"), line
    assert "invalid_json 1" in line and "empty_response" in line, line


def test_reward_tokenizer_mismatch_is_one_line(tmp_path, sampling_folders, llama3_dir, capsys):
    policy, _ = sampling_folders
    reward = fake_model(tmp_path / "rm3", keys=("score.weight",), tokenizer=Path(llama3_dir))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": QUESTIONS[0]}])
    assert "reward model tokenizer/template differs" in sample_cli(tmp_path, policy, reward, prompts, capsys)


def test_sampling_rejects_eval_prompts_as_eval_overlap(tmp_path, sampling_folders, capsys):
    from sampling.sample import main

    policy, reward = sampling_folders
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": q} for i, q in enumerate(QUESTIONS)])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"id": f"e{i}", "prompt": q.upper()} for i, q in enumerate(QUESTIONS)])
    recipe = load_recipe(None)
    with pytest.raises(DataError, match=r"no prompts to sample: 3 records: 0 kept, 3 rejected \(eval_overlap 3\)"):
        main(recipe, tmp_path / "out", {"policy": policy, "reward": reward, "prompts": prompts, "eval_prompts": evals})
    from pipeline.run import stage_inputs

    ins = stage_inputs(recipe, "sample")
    assert ins["eval_prompts"] == stage_inputs(recipe, "sft")["eval_prompts"]  # the pipeline passes them


# -- 4. prepare with a local model folder that does not exist -------------------------------------------
def test_prepare_refuses_a_missing_local_model_folder(tmp_path, capsys):
    from pipeline.run import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\noutput_dir: {tmp_path / 'runs'}\nmodel: {{name_or_path: {tmp_path / 'no-model'}}}\n"
                      "task: {kind: files}\n")
    assert main([str(recipe), "--stage", "prepare"]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"model.name_or_path {tmp_path / 'no-model'}: no such model folder" in line, line
    assert not (tmp_path / "runs" / "t" / "prepare" / "manifest.json").exists()  # no success reported


# -- 5. a .json list broken in record 2 of 4 --------------------------------------------------------------
def test_json_list_with_a_broken_record_counts_every_record(tmp_path, tiny_fmt):
    p = tmp_path / "sft.json"
    recs = [json.dumps(sft_rec(q)) for q in QUESTIONS + ["Kenji asks: what sound does a dog make?"]]
    recs[1] = repr(sft_rec(QUESTIONS[1]))  # record 2 pasted as a Python dict: single quotes, a syntax error
    p.write_text("[\n" + ",\n".join(recs) + "\n]\n")
    kept, report = load_sft(p, tiny_fmt)
    assert (report.n_in, report.n_kept, report.n_rejected) == (4, 3, 1), report
    assert report.counts == {"invalid_json": 1}
    (ex,) = report.examples["invalid_json"]
    assert ex[1] == 3 and "list element 2" in ex[2], ex  # its line, and its place in the list
    assert [r["_line"] for r in kept] == [2, 4, 5]


def test_json_list_that_cannot_be_read_past_an_error_is_one_line(tmp_path, tiny_fmt):
    p = tmp_path / "sft.json"
    good = json.dumps(sft_rec(QUESTIONS[0]))
    unbalanced, unquoted = good.replace(", {", ", {{"), good.replace(': "Maria', ": Maria")
    p.write_text(f"[\n{good},\n{unbalanced},\n{good}\n]\n")  # brackets that never balance
    with pytest.raises(DataError) as e:
        load_sft(p, tiny_fmt)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{p}: invalid JSON in list element 2 (line 3)") and "cannot be read past" in msg
    p.write_text(f"[\n{good},\n{unquoted},\n{good}\n]\n")  # a missing quote: the quotes after it pair up wrongly
    with pytest.raises(DataError, match=r"list element 2 \(line 3\): .*cannot be read past it"):
        load_sft(p, tiny_fmt)


def test_json_list_missing_comma_counts_both_records(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('[\n{"a": 1}\n{"a": 2},\n{"a": 3}\n]')
    items = list(iter_file(p))
    assert items[0] == (2, {"a": 1}) and items[2] == (4, {"a": 3})
    assert items[1][0] == 3 and items[1][1].startswith("invalid_json: list element 2: no ','")


# -- 6. UltraFeedback -----------------------------------------------------------------------------------
def test_ultrafeedback_null_score_skips_only_that_completion(tmp_path, tiny_fmt):
    rec = {"prompt_id": "uf-1", "instruction": QUESTIONS[0],
           "completions": [{"response": "moo", "overall_score": 9.0}, {"response": "woof", "overall_score": None},
                           {"response": "Sure! Here it is: moo", "overall_score": 6.5}]}
    p = write_jsonl(tmp_path / "uf.jsonl", [rec])
    kept, report = load_preferences(p, tiny_fmt)
    assert (report.n_in, report.n_kept, report.n_rejected) == (1, 1, 0)
    assert report.counts == {UNSCORED_COMPLETION: 1} and "completions[1]" in report.examples[UNSCORED_COMPLETION][0][2]
    assert kept[0]["chosen"][0]["content"] == "moo" and kept[0]["rejected"][0]["content"].startswith("Sure")
    assert "skipped_completions" not in kept[0]
    assert any("kept without their unscored completions" in line for line in report.lines())
    two = {**rec, "completions": rec["completions"][:2]}  # one scored completion left: no preference, counted
    _, report = load_preferences(write_jsonl(tmp_path / "uf2.jsonl", [two]), tiny_fmt)
    assert report.n_rejected == 1 and "1 without a numeric" in report.examples["unknown_format"][0][2]


def test_ultrafeedback_instruction_and_prompt_id_make_a_sampling_prompt(tmp_path, tiny_fmt):
    p = write_jsonl(tmp_path / "uf.jsonl", [{"prompt_id": "abc", "instruction": QUESTIONS[0], "completions": []},
                                            {"instruction": QUESTIONS[1]}])
    kept, report = load_prompts(p, tiny_fmt)
    assert report.n_kept == 2, report
    assert [r["id"] for r in kept] == ["abc", "uf-2"] and kept[0]["prompt"] == [U(QUESTIONS[0])]


# -- 7. eval data: counted, and never trained or sampled on ---------------------------------------------
def test_eval_prompts_report_is_kept_in_the_stage_metrics(tmp_path, monkeypatch):
    from core import evaluate

    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": QUESTIONS[0]}, {"prompt": QUESTIONS[1]}, "{bad",
                                                  {"prompt": ""}, {"messages": [A("x"), U("y")]}, {"prompt": QUESTIONS[0]}])
    monkeypatch.setattr(evaluate, "load_causal_lm", lambda *a, **k: SimpleNamespace(to=lambda device: None))
    seen = {}
    monkeypatch.setattr(evaluate, "evaluate_policy", lambda model, fmt, prompts, cfg, seed: seen.update(n=len(prompts)) or
                        {"gold_score": 1.0, "responses": []})
    acc = SimpleNamespace(is_main_process=True, device="cpu")
    recipe = load_recipe(None)
    metrics = evaluate.evaluate_saved_policy(acc, tmp_path, recipe, None, evals)
    data = metrics["eval_prompts_data"]
    assert seen["n"] == 2 and (data["n_in"], data["n_kept"], data["n_rejected"]) == (6, 2, 4), data
    assert data["counts"] == {"duplicate": 1, "empty_response": 1, "invalid_json": 1, "bad_role_order": 1}


def test_sft_on_the_eval_prompts_is_all_eval_overlap(tmp_path, tiny_fmt, tiny_tokenizer_dir):
    data = write_jsonl(tmp_path / "sft.jsonl", [sft_rec(q) for q in QUESTIONS])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": q} for q in QUESTIONS])
    keys = prompt_keys(load_prompts(evals)[0])
    _, report = load_sft(data, tiny_fmt, eval_prompts=keys)
    assert (report.n_kept, report.n_rejected, report.counts) == (0, 3, {EVAL_OVERLAP: 3})
    # round 2's SFT data (best-of-K): a system prompt drawn by sampling does not hide the eval prompt
    best = write_jsonl(tmp_path / "best.jsonl", [{"messages": [{"role": "system", "content": "be brief"}, U(QUESTIONS[0]), A("moo")]}])
    assert load_sft(best, tiny_fmt, eval_prompts=keys)[1].counts == {EVAL_OVERLAP: 1}
    # the stage itself: refused with the counts, before any model is loaded
    from alignment import sft

    recipe = load_recipe(None, ["sft.report_to=none"])
    with pytest.raises(DataError, match=r"no usable SFT records: 3 records: 0 kept, 3 rejected \(eval_overlap 3\)"):
        sft.main(recipe, tmp_path / "sft", {"model": tiny_tokenizer_dir, "data": data, "eval_prompts": evals})


# -- 8. make with an override value holding spaces -------------------------------------------------------
def test_make_passes_an_override_with_spaces_as_one_word():
    value = '["be brief", "be kind"]'
    res = subprocess.run(["make", "-n", "pipeline", f"sampling.system_prompts={value}", "sft.lr=1e-4", "name=it's"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    (cmd,) = [line for line in res.stdout.splitlines() if "-m pipeline.run" in line]
    argv = shlex.split(cmd)
    assert argv[3] == "recipes/default.yaml"
    assert sorted(argv[4:]) == sorted([f"sampling.system_prompts={value}", "sft.lr=1e-4", "name=it's"]), cmd
    recipe = load_recipe(ROOT / argv[3], argv[4:])
    assert recipe.sampling.system_prompts == ["be brief", "be kind"] and recipe.name == "it's"


# -- 9. the dashboard server serves report pages only ---------------------------------------------------
def test_dashboard_server_serves_reports_only(tmp_path):
    from evals.dashboard import make_server

    root = tmp_path / "runs"
    (root / "demo" / "report").mkdir(parents=True)
    (root / "demo" / "sft" / "model").mkdir(parents=True)
    (root / "index.html").write_text("<p>runs</p>")
    (root / "demo" / "report" / "index.html").write_text("<p>demo</p>")
    (root / "demo" / "sft" / "model" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "secret.txt").write_text("secret")
    (root / "demo" / "report" / "leak.txt").symlink_to(tmp_path / "secret.txt")  # out of the root
    (root / "demo" / "report" / "weights").symlink_to(root / "demo" / "sft" / "model" / "model.safetensors")
    (root / "escape").symlink_to(tmp_path)
    server = make_server(root, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(base + path, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        assert status("/index.html") == status("/") == status("/demo/report/index.html") == 200
        for path in ("/demo/sft/model/model.safetensors", "/demo/report/leak.txt", "/demo/report/weights",
                     "/escape/secret.txt", "/../secret.txt", "/%2e%2e/secret.txt", "/demo/report/", "/demo/",
                     "/demo/sft/model/"):
            assert status(path) == 404, path
    finally:
        server.shutdown()
        server.server_close()


def test_default_task_sizes_past_its_prompts_are_one_line(tmp_path):
    """task.n_preference=3000 asks the default task for more distinct prompts than its categories hold
    (about 4,900 in all): the prepare stage used to loop forever; now it exits 2 with one line naming the keys."""
    import sys

    from data import default_task
    from data.formats import DataError

    with pytest.raises(DataError, match="task.n_sft"):
        default_task.generate(seed=4, n_preference=3000)
    res = subprocess.run([sys.executable, "-m", "pipeline.run", "recipes/default.yaml", "--stage", "prepare",
                          "task.n_preference=3000", f"output_dir={tmp_path}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "ran out" in res.stderr and "task.n_preference" in res.stderr
