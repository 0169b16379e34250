"""The doctor (data/doctor.py): fixture model folders, each with one planted defect, built here from a tiny
random LlamaForCausalLM (hidden 64, 2 layers) and the real 128k tokenizer; nothing downloaded. Every check
finds its defect and stays silent on a clean folder; --fix repairs untrained rows with the function the
stages use; the command and `make doctor` exit non-zero on an error; a stage does not start on one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from data import doctor
from data.chat_format import CHAT_TEMPLATE, ChatFormat, chat_template, load_tokenizer
from data.doctor import DoctorError, Settings, diagnose

ROOT = Path(__file__).resolve().parents[1]
EOT_ID, EOM_ID, START_ID, PYTHON_TAG_ID, PAD_ID = 128009, 128008, 128006, 128010, 128004
S31 = Settings(template="llama3.1")
S30 = Settings(template="llama3")


def build(out: Path, fmt: ChatFormat, rope31: bool = True, vocab: int | None = None) -> Path:
    """A tiny Llama folder as a stage would find it: safetensors, config, generation_config and tokenizer
    (saved through the chat format: its pad, eos and template). rope31: Llama 3.1's RoPE scaling."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024, "rope_theta": 500000.0} if rope31 else None
    ids = {"bos_token_id": fmt.bos_id, "eos_token_id": list(fmt.stop_ids), "pad_token_id": fmt.pad_id} if not vocab else {}
    cfg = LlamaConfig(vocab_size=vocab or len(fmt.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=2048,
                      rope_theta=500000.0, rope_scaling=rope, **ids)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=fmt.bos_id, eos_token_id=list(fmt.stop_ids), pad_token_id=fmt.pad_id)
    model.save_pretrained(str(out), safe_serialization=True)
    fmt.tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def clean31(tmp_path_factory, llama31_fmt):
    return build(tmp_path_factory.mktemp("doctor") / "clean31", llama31_fmt)


@pytest.fixture(scope="module")
def clean30(tmp_path_factory, llama3_fmt):
    return build(tmp_path_factory.mktemp("doctor") / "clean30", llama3_fmt, rope31=False)


def variant(base: Path, out: Path) -> Path:
    """A copy of `base` (hard links: cheap); edit it only through the helpers below, which write new files."""
    shutil.copytree(base, out, copy_function=os.link)
    return out


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.unlink()  # never write through a hard link into the clean folder
    path.write_text(json.dumps(data))


def write_text(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    path.write_text(text)


def zero_rows(folder: Path, rows: dict[str, list[int]]) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    state = load_file(str(f))
    for name, ids in rows.items():
        state[name][ids] = 0.0
    f.unlink()
    save_file(state, str(f), metadata={"format": "pt"})


def codes(found) -> dict[str, str]:
    return {f.code: f.severity for f in found}


# -- clean folders: no finding --------------------------------------------------------------------------------
def test_clean_folders_and_tokenizer_names_are_silent(clean31, clean30):
    for folder, settings in ((clean31, S31), (clean30, S30), (clean31, Settings()), ("llama3.1", S31), ("llama3", S30)):
        found, fmt = diagnose(folder, settings)
        assert found == [], (folder, found)
    assert diagnose(clean31)[1].template == "llama3.1" and diagnose(clean30)[1].template == "llama3"  # their own


# -- one planted defect each -------------------------------------------------------------------------------------
def _double_bos(d):
    tj = d / "tokenizer.json"
    data = json.loads(tj.read_text())
    bos = {"id": "<|begin_of_text|>", "type_id": 0}
    data["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": bos}, {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"SpecialToken": bos}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": bos},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000], "tokens": ["<|begin_of_text|>"]}}}
    write_text(tj, json.dumps(data))  # as Meta's own HF tokenizers do


def _pad_missing(d):
    tj = d / "tokenizer.json"
    data = json.loads(tj.read_text())
    for t in data["added_tokens"]:  # neither <|finetune_right_pad_id|> nor <|reserved_special_token_2|> left
        t["content"] = {128004: "<|reserved_special_token_250|>", 128005: "<|reserved_special_token_251|>"}.get(t["id"], t["content"])
    write_text(tj, json.dumps(data))


DEFECTS = {  # name: (base, edit, settings, {code: severity} expected exactly)
    "double_bos": ("31", _double_bos, S31, {"double_bos": "warning"}),
    "add_bos_token": ("31", lambda d: edit_json(d / "tokenizer_config.json", add_bos_token=True), S31, {"double_bos": "warning"}),
    "pad_is_eot": ("31", lambda d: edit_json(d / "config.json", pad_token_id=EOT_ID), S31, {"pad_is_stop": "error"}),
    "pad_is_eos_token": ("31", lambda d: edit_json(d / "tokenizer_config.json", pad_token="<|end_of_text|>"), S31, {"pad_is_stop": "error"}),
    "pad_is_text": ("31", lambda d: edit_json(d / "generation_config.json", pad_token_id=0), S31, {"pad_as_text": "error"}),
    "pad_missing": ("31", _pad_missing, S31, {"pad_missing": "error"}),
    "stop_eos_only": ("31", lambda d: edit_json(d / "generation_config.json", eos_token_id=128001), S31, {"stop_tokens": "error"}),
    "stop_no_eom": ("31", lambda d: edit_json(d / "generation_config.json", eos_token_id=[EOT_ID, 128001]), S31, {"stop_tokens": "error"}),
    "untrained_special": ("31", lambda d: zero_rows(d, {"model.embed_tokens.weight": [EOT_ID, EOM_ID], "lm_head.weight": [START_ID]}),
                          S31, {"untrained_special": "error"}),
    "template_mismatch": ("31", lambda d: write_text(d / "chat_template.jinja", CHAT_TEMPLATE), S31, {"template_mismatch": "error"}),
    "template_tokens": ("30", lambda d: (d / "chat_template.jinja").unlink(), S31, {"template_tokens": "error"}),  # 3.0 names
    "model_family": ("31", lambda d: (d / "chat_template.jinja").unlink(), S30, {"model_family": "warning"}),
    "template_unknown": ("31", lambda d: write_text(d / "chat_template.jinja", "{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}"),
                         S31, {"template_unknown": "warning"}),
    "template_date": ("31", lambda d: write_text(d / "chat_template.jinja", chat_template("llama3.1", "1 Jan 2025")), S31,
                      {"template_date": "warning"}),
    "max_length": ("31", None, Settings(template="llama3.1", max_lengths={"sft.max_length": 4096}), {"max_length": "error"}),
    "fp16_on_bf16": ("31", lambda d: edit_json(d / "config.json", dtype="bfloat16"), Settings(template="llama3.1", dtype="float16"),
                     {"dtype": "warning"}),
    "bin_only": ("31", lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(b"never unpickled")),
                 S31, {"pickle_weights": "error"}),
    "dropout": ("31", lambda d: edit_json(d / "config.json", attention_dropout=0.1), S31, {"dropout": "warning"}),
    "recipe_dropout": ("31", None, Settings(template="llama3.1", dropout=0.1), {"dropout": "warning"}),
}


@pytest.mark.parametrize("name", list(DEFECTS))
def test_each_check_finds_its_planted_defect(name, clean31, clean30, tmp_path):
    base, edit, settings, expected = DEFECTS[name]
    folder = variant(clean31 if base == "31" else clean30, tmp_path / name)
    if edit:
        edit(folder)
    found, _ = diagnose(folder, settings)
    assert codes(found) == expected, found
    for f in found:  # one line each, and what to do
        assert f.message and f.fix and "\n" not in f.line()


def test_vocab_larger_than_the_embedding(tmp_path, llama31_fmt):
    folder = build(tmp_path / "small", llama31_fmt, vocab=1024)
    found, _ = diagnose(folder, S31)
    assert codes(found) == {"vocab_size": "error"}
    assert "128256 tokens, the model 1024 embedding rows" in found[0].message


def test_untrained_rows_are_named_and_a_warning_where_the_stage_resets_them(clean31, tmp_path):
    folder = variant(clean31, tmp_path / "u")
    zero_rows(folder, {"model.embed_tokens.weight": [EOT_ID, EOM_ID], "lm_head.weight": [START_ID]})
    found, _ = diagnose(folder, S31)
    msgs = " ".join(f.message for f in found)
    assert "embed_tokens rows of <|eom_id|> (128008), <|eot_id|> (128009)" in msgs and "lm_head rows of <|start_header_id|> (128006)" in msgs
    stage = Settings.from_recipe({"model": {"chat_template": "llama3.1"}}, stage="sft")
    assert stage.resets_embeddings and codes(diagnose(folder, stage)[0]) == {"untrained_special": "warning"}
    no_reset = Settings.from_recipe({"model": {"chat_template": "llama3.1"}, "sft": {"init_special_embeddings": False}}, stage="sft")
    assert codes(diagnose(folder, no_reset)[0]) == {"untrained_special": "error"}
    assert codes(diagnose(folder, Settings.from_recipe({"model": {"chat_template": "llama3.1"}}, stage="sample"))[0]) == {"untrained_special": "error"}


# -- --fix: one shared function ----------------------------------------------------------------------------------
def test_fix_resets_rows_with_the_stages_function(clean31, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from core.models import init_special_embeddings

    folder = variant(clean31, tmp_path / "broken")
    zero_rows(folder, {"model.embed_tokens.weight": [EOT_ID, PYTHON_TAG_ID], "lm_head.weight": [START_ID]})
    edit_json(folder / "generation_config.json", eos_token_id=128001)
    report = doctor.fix(folder, tmp_path / "fixed", S31)
    assert report["changed"]["embedding_rows_reset"] == {EOT_ID: "<|eot_id|>", START_ID: "<|start_header_id|>", PYTHON_TAG_ID: "<|python_tag|>"}
    assert report["changed"]["eos_token_id"] == [[128001], [EOT_ID, EOM_ID, 128001]]
    assert codes(doctor.Finding(**f) for f in report["before"]) == {"untrained_special": "error", "stop_tokens": "error"}
    assert report["after"] == [] and diagnose(tmp_path / "fixed", S31)[0] == []
    assert json.loads((tmp_path / "fixed" / "doctor_report.json").read_text())["changed"]["eos_token_id"][1] == [EOT_ID, EOM_ID, 128001]
    fixed = load_file(str(tmp_path / "fixed" / "model.safetensors"))
    emb = fixed["model.embed_tokens.weight"]
    assert torch.allclose(emb[EOT_ID], load_file(str(folder / "model.safetensors"))["model.embed_tokens.weight"].mean(0))
    # the stages' init_special_embeddings is the same function: the same weights
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    assert init_special_embeddings(model, sorted(doctor.template_ids(load_tokenizer(folder, "llama3.1")))) == [START_ID, EOT_ID, PYTHON_TAG_ID]
    assert torch.equal(model.get_input_embeddings().weight, emb) and torch.equal(model.lm_head.weight, fixed["lm_head.weight"])


def test_the_reward_model_from_any_init_gets_the_reset(clean31, tmp_path, llama31_fmt):
    """init: base gives a sequence-classification model (no LM head): its input rows are reset the same way."""
    from core.models import init_special_embeddings
    from reward.model import init_reward_model

    folder = variant(clean31, tmp_path / "base")
    zero_rows(folder, {"model.embed_tokens.weight": [EOT_ID]})
    model, new_head = init_reward_model(folder, PAD_ID)
    assert new_head and init_special_embeddings(model, sorted(doctor.template_ids(llama31_fmt))) == [EOT_ID]
    assert float(model.get_input_embeddings().weight[EOT_ID].detach().norm()) > 0


def test_the_stages_load_the_policy_without_dropout(clean31, tmp_path):
    from core.models import load_causal_lm
    from reward.model import init_reward_model

    folder = variant(clean31, tmp_path / "dropout")
    edit_json(folder / "config.json", attention_dropout=0.1)
    assert load_causal_lm(folder).config.attention_dropout == 0.0  # model.dropout: 0.0, the default
    assert load_causal_lm(folder, dropout=None).config.attention_dropout == 0.1  # null: the checkpoint's own
    assert init_reward_model(folder, PAD_ID)[0].config.attention_dropout == 0.0


# -- data, through the validator ------------------------------------------------------------------------------
def _sft(*turns, **extra):
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)], **extra}


def test_data_findings(clean31, tmp_path):
    path = tmp_path / "sft.jsonl"
    records = [_sft("Hi", "Hello!"), _sft("Hi", "Hello!"),  # a duplicate
               _sft("Say <|eot_id|>", "no"), _sft("q", "   "), _sft("long " * 200, "ok"),
               _sft("What is 2+2?", "4")]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    found, _ = diagnose(clean31, Settings(template="llama3.1", max_lengths={"sft.max_length": 128}), [str(path)])
    assert codes(found) == {"data_duplicates": "warning", "data_special_tokens": "warning", "data_empty": "warning",
                            "data_overlong": "warning"}
    assert any("1 of 6 records (16.7%) are longer than max_length 128" in f.message for f in found)
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps(_sft("Hi", "Hello!")) + "\n")
    assert diagnose(clean31, S31, [str(clean)])[0] == []


def test_data_that_cannot_train(clean31, tmp_path, llama31_fmt):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "gpt", "content": "x"}]}) + "\n")
    assert codes(diagnose(clean31, S31, [str(bad)])[0]) == {"data_rejected": "warning", "data_unusable": "error"}
    pad = tmp_path / "pad.jsonl"
    ids = llama31_fmt.text_ids("fine") + [PAD_ID, EOT_ID]
    pad.write_text(json.dumps({**_sft("Hi", "fine"), "completion_ids": ids}) + "\n")
    assert codes(diagnose(clean31, S31, [str(pad)])[0]) == {"pad_as_text": "error"}


def test_a_special_token_the_data_uses_is_checked(clean31, tmp_path, llama31_fmt):
    """A reserved token used only by the data's ids: its row is checked with --data, not without."""
    folder = variant(clean31, tmp_path / "r")
    reserved = llama31_fmt.tokenizer.convert_tokens_to_ids("<|reserved_special_token_5|>")
    zero_rows(folder, {"model.embed_tokens.weight": [reserved]})
    assert diagnose(folder, S31)[0] == []
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({**_sft("Hi", "fine"), "completion_ids": [reserved] + llama31_fmt.text_ids("fine") + [EOT_ID]}) + "\n")
    assert codes(diagnose(folder, S31, [str(data)])[0]) == {"untrained_special": "error"}


# -- the command, make doctor, a stage ---------------------------------------------------------------------
def test_the_command_exit_codes(clean31, tmp_path, capsys):
    assert doctor.main([str(clean31)]) == 0
    assert "no findings" in capsys.readouterr().out
    broken = variant(clean31, tmp_path / "b")
    edit_json(broken / "config.json", pad_token_id=EOT_ID)
    assert doctor.main([str(broken), "--recipe", str(ROOT / "recipes" / "llama-3.1-8b-instruct-full.yaml")]) == 1
    out = capsys.readouterr().out
    assert "error   pad_is_stop: config.json pad_token_id is <|eot_id|> (128009)" in out and "do: set it to <|finetune_right_pad_id|>" in out
    assert doctor.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    # a recipe that says llama3 on a 3.1 folder: the mismatch is named
    assert doctor.main([str(clean31), "--recipe", str(ROOT / "recipes" / "default.yaml")]) == 1
    assert "the recipe's model.chat_template is llama3, the tokenizer's own chat_template is llama3.1" in capsys.readouterr().out


def test_a_run_folder(clean31, tmp_path, capsys):
    run = tmp_path / "runs" / "x"
    variant(clean31, run / "sft" / "model")
    (run / "sft" / "manifest.json").write_text(json.dumps({"config": {"model": {"chat_template": "llama3.1"}, "sft": {"max_length": 9999}}}))
    assert doctor.main([str(run)]) == 1  # the recorded recipe: max_length over the model's 2048 positions
    assert "sft.max_length 9999 > the model's max_position_embeddings 2048" in capsys.readouterr().out


def test_make_doctor_exits_non_zero_on_an_error(clean31, tmp_path):
    if subprocess.run(["make", "-q", "install"], cwd=ROOT).returncode != 0:
        pytest.skip("the virtualenv is not installed as the Makefile wants it (make install)")
    broken = variant(clean31, tmp_path / "b")
    edit_json(broken / "generation_config.json", eos_token_id=128001)
    res = subprocess.run(["make", "--no-print-directory", "doctor", f"MODEL={broken}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "stop_tokens" in res.stdout
    res = subprocess.run(["make", "--no-print-directory", "doctor", f"MODEL={clean31}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_stage_does_not_start_on_an_error(clean31, tmp_path, capsys):
    from core.config import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "default.yaml", ["model.chat_template=llama3.1"])
    broken = variant(clean31, tmp_path / "b")
    edit_json(broken / "generation_config.json", eos_token_id=128001)
    with pytest.raises(DoctorError, match=r"^doctor: .*: stop_tokens: generation_config.json eos_token_id \[128001\] lacks"):
        doctor.before_stage(recipe, "sft", {"model": broken})
    warned = variant(clean31, tmp_path / "w")
    edit_json(warned / "config.json", attention_dropout=0.1)
    assert codes(doctor.before_stage(recipe, "dpo", {"model": warned})) == {"dropout": "warning"}
    assert "[dpo] doctor: warning: dropout: config.json has attention_dropout=0.1" in capsys.readouterr().err
    assert doctor.before_stage(recipe, "sample", {"policy": clean31}) == []
    assert doctor.before_stage(recipe, "eval", {}) == []


def test_the_pipeline_stops_a_stage_with_one_line_and_exit_2(clean31, tmp_path, capsys):
    from pipeline import run

    broken = variant(clean31, tmp_path / "b")
    edit_json(broken / "config.json", pad_token_id=EOT_ID)
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps(_sft("Hi", "Hello!")) + "\n")
    rc = run.main([str(ROOT / "recipes" / "default.yaml"), "--stage", "sft", f"output_dir={tmp_path / 'runs'}",
                   f"model.name_or_path={broken}", "model.chat_template=llama3.1", "task.kind=files",
                   f"task.sft_data={data}", f"task.eval_prompts_data={data}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: doctor: ") and "pad_is_stop" in err[-1]
    assert not (tmp_path / "runs" / "default" / "sft" / "model").exists()
