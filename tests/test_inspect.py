"""data.inspect: the token view of a data file, its --json dump, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from data import inspect as di
from data.chat_format import render

ROOT = Path(__file__).resolve().parents[1]
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Repeat the word river 2 times."},
        {"role": "assistant", "content": "river river"}]


def run_cli(*args):
    """The CLI as a user runs it (a fresh interpreter), for the exit code and stderr."""
    return subprocess.run([sys.executable, "-m", "data.inspect", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_json_output_equals_the_chat_format(tmp_path, tiny_fmt, tiny_tokenizer_dir, capsys):
    src = tmp_path / "conv.json"
    src.write_text(json.dumps([{"messages": CONV}, {"messages": CONV[1:]}]))
    out = tmp_path / "out" / "first.json"
    assert di.main([str(src), "--tokenizer", str(tiny_tokenizer_dir), "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    enc = tiny_fmt.encode(CONV)
    assert got == {"text": render(CONV), "input_ids": enc.input_ids, "assistant_mask": enc.assistant_mask,
                   "special_mask": enc.special_mask}
    shown = capsys.readouterr().out
    assert "2 conversations shown" in shown and f"{len(enc)} tokens: {sum(enc.assistant_mask)} trained" in shown


def test_colours_legend_and_counts(tmp_path, tiny_fmt, tiny_tokenizer_dir, capsys):
    src = tmp_path / "conv.jsonl"
    src.write_text("\n".join(json.dumps({"messages": CONV}) for _ in range(5)) + "\n")
    assert di.main([str(src), "--tokenizer", str(tiny_tokenizer_dir), "--color", "always"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("legend: ")
    assert shown.count("== line ") == 3  # the first N = 3 conversations by default
    assert f"{di.STYLES[1, 0]}" in shown and f"{di.STYLES[0, 0]}" in shown
    assert f"{di.STYLES[0, 1]}<|begin_of_text|>{di.RESET}" in shown  # masked special: bold
    assert f"{di.STYLES[1, 1]}<|eot_id|>{di.RESET}" in shown  # the assistant's eot is trained
    assert f"{di.STYLES[0, 1]}<|eot_id|>{di.RESET}" in shown  # the user's eot is not
    assert "\\n\\n" in shown  # the header's newlines are visible


def test_plain_output_and_preference_records(tmp_path, tiny_tokenizer_dir, capsys):
    src = tmp_path / "pref.jsonl"
    src.write_text(json.dumps({"prompt": "Repeat the word river 2 times.", "chosen": "river river", "rejected": "river"}) + "\n")
    assert di.main([str(src), "--tokenizer", str(tiny_tokenizer_dir), "-n", "1", "--color", "never"]) == 0
    shown = capsys.readouterr().out
    assert "\x1b[" not in shown
    assert "<|begin_of_text|>|<|start_header_id|>|user|<|end_header_id|>|\\n\\n" in shown
    assert shown.count("<|eot_id|>") == 2  # prompt + chosen only


def test_missing_file_is_one_line_and_exit_2(tmp_path, tiny_tokenizer_dir):
    r = run_cli(tmp_path / "nope.jsonl", "--tokenizer", tiny_tokenizer_dir)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == f"error: {tmp_path / 'nope.jsonl'}: file not found\n"


def test_bad_json_is_one_line_with_its_line_number(tmp_path, tiny_tokenizer_dir):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"messages": CONV}) + "\n{not json\n")
    r = run_cli(src, "--tokenizer", tiny_tokenizer_dir)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {src}:2: invalid json: ") and r.stderr.count("\n") == 1


def test_bad_tokenizer_and_bad_record(tmp_path, tiny_tokenizer_dir, capsys):
    src = tmp_path / "conv.jsonl"
    src.write_text(json.dumps({"messages": CONV}) + "\n")
    assert di.main([str(src), "--tokenizer", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: no tokenizer.json found\n"
    bad = tmp_path / "tok.json"
    bad.write_text("{}")
    assert di.main([str(src), "--tokenizer", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: cannot load tokenizer") and err.count("\n") == 1
    src.write_text(json.dumps({"messages": CONV}) + "\n" + json.dumps({"question": "q"}) + "\n")
    assert di.main([str(src), "--tokenizer", str(tiny_tokenizer_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src}:2: neither an SFT nor a preference record") and err.count("\n") == 1


def test_multibyte_tokens_are_shown_as_bytes(tiny_fmt):
    pieces = [di.token_text(tiny_fmt, t) for t in tiny_fmt.text_ids("héllo ✓")]
    assert "".join(pieces) != "" and "\ufffd" not in "".join(pieces)
    assert any("\\x" in p for p in pieces)  # the tiny vocabulary splits é into bytes


def test_tokenizer_names_as_recipes_take_them(tmp_path, llama3_fmt, llama31_fmt, capsys):
    """`make inspect TOKENIZER=llama3` (or llama3.1, the template names) resolves as model.tokenizer does:
    one resolver, data.chat_format.load_tokenizer."""
    src = tmp_path / "conv.jsonl"
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    src.write_text(json.dumps({"messages": CONV}) + "\n" + json.dumps(
        {"messages": [CONV[1], call, {"role": "ipython", "content": "21 C"}, CONV[2]],
         "tools": [{"type": "function", "function": {"name": "get_weather"}}]}) + "\n")
    out = tmp_path / "first.json"
    assert di.main([str(src), "--tokenizer", "llama3", "-n", "1", "--json", str(out)]) == 0
    assert "template: llama3\n" in capsys.readouterr().out
    assert json.loads(out.read_text())["input_ids"] == llama3_fmt.encode(CONV).input_ids
    assert di.main([str(src), "--tokenizer", "llama3.1", "--json", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "template: llama3.1 (Today Date: 26 Jul 2024)" in shown and "Cut|ting| Knowledge| Date" in shown
    assert "<|eot_id|>|<|start_header_id|>|ipy|thon|<|end_header_id|>" in shown  # the tool record, with its tools
    got = json.loads(out.read_text())
    assert got["text"] == llama31_fmt.render(CONV) and got["input_ids"] == llama31_fmt.encode(CONV).input_ids
    assert di.main([str(src), "--tokenizer", "llama3", "--template", "llama3.1"]) == 2  # 3.0 names: no <|eom_id|>
    assert "tokenizer `llama3.1` has the 3.1 names" in capsys.readouterr().err


def test_tiny_copies_a_named_tokenizer(tmp_path):
    from data.chat_format import load_tokenizer, saved_chat_template
    from data.tiny import train_tokenizer

    fmt = train_tokenizer([], tmp_path / "tok", source="llama3.1", template="llama3.1", date="1 Jan 2025")
    assert (fmt.template, fmt.date, fmt.eom_id) == ("llama3.1", "1 Jan 2025", 128008)
    again = load_tokenizer(tmp_path / "tok")  # the folder carries the family and date
    assert (again.template, again.date) == ("llama3.1", "1 Jan 2025") and "1 Jan 2025" in saved_chat_template(tmp_path / "tok")
