"""data.validate: one fixture file per defect code; every record is kept or counted, at its file and line."""

from __future__ import annotations

import json

import pytest

from data import validate as v
from data.formats import DataError
from tests.conftest import A, S, U

GOOD_SFT = {"messages": [{"role": "user", "content": "Repeat the word river 2 times."},
                         {"role": "assistant", "content": "river river"}]}
GOOD_PREF = {"prompt": [{"role": "user", "content": "Repeat the word river 2 times."}],
             "chosen": [{"role": "assistant", "content": "river river"}],
             "rejected": [{"role": "assistant", "content": "river river river"}]}
GOOD_PROMPT = {"id": "p0", "prompt": [{"role": "user", "content": "Repeat the word river 2 times."}]}


def write(tmp_path, lines, name="data.jsonl") -> str:
    """A JSONL file: dicts are dumped, bytes/str written as they are (to make broken lines)."""
    p = tmp_path / name
    with open(p, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(p)


def load(kind, path, fmt, **kw):
    return {"sft": v.load_sft, "pref": v.load_preferences, "prompt": v.load_prompts}[kind](path, fmt, **kw)


def assert_rejected(report, path, code, line, n=1):
    """The invariant, and `code` counted with its first example at path:line."""
    assert report.n_in == report.n_kept + report.n_rejected
    assert report.counts.get(code) == n, report.lines()
    assert report.examples[code][0][:2] == (path, line)
    assert any(s.startswith(f"{path}:{line}: {code}: ") for s in report.lines())


# One case per defect: (loader, bad record on line 2, code). Line 1 is always a good record.
CASES = {
    "invalid_json": ("sft", '{"messages": [', v.INVALID_JSON),
    "json_not_object": ("sft", "[1, 2]", v.INVALID_JSON),
    "not_utf8": ("sft", b'{"messages": "\xc3\x28"}', v.NOT_UTF8),
    "unknown_format_sft": ("sft", {"question": "q", "answer": "a"}, v.UNKNOWN_FORMAT),
    "unknown_format_pref": ("pref", {"prompt": "q", "chosen": "a"}, v.UNKNOWN_FORMAT),
    "unknown_format_prompt": ("prompt", {"question": "q"}, v.UNKNOWN_FORMAT),
    "tied_scores": ("pref", {"prompt": "q", "completions": [{"response": "a", "score": 1}, {"response": "b", "score": 1}]},
                    v.TIED_SCORES),
    "missing_role": ("sft", {"messages": [{"content": "q"}, A("a")]}, v.MISSING_ROLE),
    "missing_content": ("sft", {"messages": [U("q"), {"role": "assistant", "content": None}]}, v.MISSING_CONTENT),
    "unknown_role": ("sft", {"messages": [U("q"), {"role": "gpt", "content": "a"}]}, v.UNKNOWN_ROLE),
    "tool_role": ("pref", {"prompt": [U("q"), {"role": "tool", "content": "x"}], "chosen": "a", "rejected": "b"},
                  v.UNKNOWN_ROLE),
    "system_not_first": ("sft", {"messages": [U("q"), S("s"), A("a")]}, v.BAD_ROLE_ORDER),
    "starts_with_assistant": ("sft", {"messages": [A("hello"), U("q"), A("a")]}, v.BAD_ROLE_ORDER),
    "two_users": ("sft", {"messages": [U("q"), U("q2"), A("a")]}, v.BAD_ROLE_ORDER),
    "prompt_ends_with_assistant": ("pref", {"prompt": [U("q"), A("a")], "chosen": "b", "rejected": "c"}, v.BAD_ROLE_ORDER),
    "response_holds_user": ("pref", {"prompt": [U("q")], "chosen": [A("a"), U("more"), A("b")], "rejected": [A("c")]},
                            v.BAD_ROLE_ORDER),
    "prompt_record_ends_with_assistant": ("prompt", {"prompt": [U("q"), A("a")]}, v.BAD_ROLE_ORDER),
    "not_ending_with_assistant": ("sft", {"messages": [U("q"), A("a"), U("q2")]}, v.NOT_ENDING_WITH_ASSISTANT),
    "empty_sft_reply": ("sft", {"messages": [U("q"), A("  \n")]}, v.EMPTY_RESPONSE),
    "empty_chosen": ("pref", {"prompt": "q", "chosen": " ", "rejected": "b"}, v.EMPTY_RESPONSE),
    "empty_rejected_list": ("pref", {"prompt": [U("q")], "chosen": [A("a")], "rejected": []}, v.EMPTY_RESPONSE),
    "empty_prompt": ("pref", {"prompt": [], "chosen": "a", "rejected": "b"}, v.EMPTY_RESPONSE),
    "empty_prompt_text": ("prompt", {"prompt": "\t"}, v.EMPTY_RESPONSE),
    "special_eot": ("sft", {"messages": [U("q"), A("a<|eot_id|>")]}, v.SPECIAL_TOKEN_IN_CONTENT),
    "special_reserved": ("pref", {"prompt": "q <|reserved_special_token_7|>", "chosen": "a", "rejected": "b"},
                         v.SPECIAL_TOKEN_IN_CONTENT),
    "special_in_prompt_record": ("prompt", {"prompt": "<|begin_of_text|>q"}, v.SPECIAL_TOKEN_IN_CONTENT),
    "chosen_equals_rejected": ("pref", {"prompt": "q", "chosen": "same", "rejected": " same\n"}, v.CHOSEN_EQUALS_REJECTED),
    "edited_equals_chosen": ("pref", {"prompt": "q", "edited": "x", "chosen": "x", "rejected": "y"},
                             v.CHOSEN_EQUALS_REJECTED),
    "duplicate_sft": ("sft", GOOD_SFT, v.DUPLICATE),
    "duplicate_pref_other_id": ("pref", {**GOOD_PREF, "id": "other"}, v.DUPLICATE),
    "duplicate_prompt": ("prompt", {**GOOD_PROMPT, "id": "p1"}, v.DUPLICATE),
    "duplicate_prompt_id": ("prompt", {"id": "p0", "prompt": "another question"}, v.DUPLICATE),
    "overlong_sft": ("sft", {"messages": [U("q"), A("river " * 400)]}, v.OVERLONG),
    "overlong_pref": ("pref", {"prompt": "q", "chosen": "river " * 400, "rejected": "b"}, v.OVERLONG),
    "overlong_prompt": ("prompt", {"prompt": "river " * 400}, v.OVERLONG),
}


@pytest.mark.parametrize("case", CASES)
def test_each_defect_is_counted_at_its_line(tmp_path, tiny_fmt, case):
    kind, bad, code = CASES[case]
    good = {"sft": GOOD_SFT, "pref": GOOD_PREF, "prompt": GOOD_PROMPT}[kind]
    path = write(tmp_path, [good, bad])
    kept, report = load(kind, path, tiny_fmt, max_length=256)
    assert (report.n_in, report.n_kept, report.n_rejected) == (2, 1, 1)
    assert_rejected(report, path, code, 2)
    assert [r["_line"] for r in kept] == [1]


def test_eval_overlap(tmp_path, tiny_fmt):
    eval_keys = v.prompt_keys([{"prompt": [U("Reverse the list: red, blue, green.")]}])
    for kind, bad in [("sft", {"messages": [U("reverse the list:  red, blue, green."), A("green, blue, red")]}),
                      ("pref", {"prompt": [S("Be terse."), U("Reverse the list: red, blue, green.")], "chosen": "a",
                                "rejected": "b"}),
                      ("prompt", {"prompt": "Reverse the list: red, blue, green."})]:
        good = {"sft": GOOD_SFT, "pref": GOOD_PREF, "prompt": GOOD_PROMPT}[kind]
        path = write(tmp_path, [good, bad], name=f"{kind}.jsonl")
        kept, report = load(kind, path, tiny_fmt, eval_prompts=eval_keys)
        assert_rejected(report, path, v.EVAL_OVERLAP, 2)
    # raw strings work as eval prompts too: prompt_key normalises them the same way
    assert v.prompt_key("  Reverse THE list: red, blue, green. ") in eval_keys


def test_truncate_keeps_a_preference_cut_to_fit(tmp_path, tiny_fmt):
    long = "river " * 400
    path = write(tmp_path, [{**GOOD_PREF, "chosen": long, "chosen_ids": list(range(500))}])
    kept, report = v.load_preferences(path, tiny_fmt, max_length=64, overlong="truncate")
    assert (report.n_kept, report.n_rejected, report.counts) == (1, 0, {v.TRUNCATED: 1})
    rec = kept[0]
    assert rec["truncated"] == ["chosen"]
    assert rec["chosen"][0]["content"].startswith("river river") and len(rec["chosen"][0]["content"]) < len(long)
    n = len(tiny_fmt.encode_preference(rec["prompt"], rec["chosen"]))
    assert 60 <= n <= 64
    assert len(rec["prompt_ids"] if "prompt_ids" in rec else tiny_fmt.encode_prompt(rec["prompt"])) + len(rec["chosen_ids"]) == 64
    assert rec["rejected"] == GOOD_PREF["rejected"]


def test_chosen_equals_rejected_after_truncation(tmp_path, tiny_fmt):
    a, b = "river " * 300 + "stone", "river " * 300 + "cloud"
    path = write(tmp_path, [GOOD_PREF, {"prompt": "Repeat the word river 2 times.", "chosen": a, "rejected": b}])
    _, report = v.load_preferences(path, tiny_fmt, max_length=64, overlong="drop")
    assert_rejected(report, path, v.OVERLONG, 2)
    _, report = v.load_preferences(path, tiny_fmt, max_length=64, overlong="truncate")
    assert_rejected(report, path, v.CHOSEN_EQUALS_REJECTED, 2)
    assert "after truncation" in report.examples[v.CHOSEN_EQUALS_REJECTED][0][2]


def test_truncate_cannot_save_a_prompt_that_fills_max_length(tmp_path, tiny_fmt):
    path = write(tmp_path, [{"prompt": "river " * 100, "chosen": "a", "rejected": "b"}])
    _, report = v.load_preferences(path, tiny_fmt, max_length=32, overlong="truncate")
    assert_rejected(report, path, v.OVERLONG, 1)
    path = write(tmp_path, [{"messages": [U("river " * 100), A("a")]}], name="sft.jsonl")
    _, report = v.load_sft(path, tiny_fmt, max_length=32, overlong="truncate")
    assert_rejected(report, path, v.OVERLONG, 1)


def test_sft_truncate_cuts_the_encoded_ids(tmp_path, tiny_fmt):
    msgs = [U("Repeat the word river 2 times."), A("river " * 100)]
    path = write(tmp_path, [{"messages": msgs}])
    kept, report = v.load_sft(path, tiny_fmt, max_length=40, overlong="truncate")
    assert report.n_kept == 1 and report.counts == {v.TRUNCATED: 1}
    enc, full = kept[0]["encoded"], tiny_fmt.encode(msgs)
    assert kept[0]["truncated"] is True and kept[0]["messages"] == msgs
    assert len(enc) == 40 and enc.input_ids == full.input_ids[:40] and enc.assistant_mask == full.assistant_mask[:40]
    assert enc.input_ids[-1] != tiny_fmt.eot_id  # no eot at the cut: the model is not taught to stop there
    with pytest.raises(ValueError, match="overlong must be"):
        v.load_sft(path, tiny_fmt, overlong="cut")


def test_sft_records_carry_their_encoding(tmp_path, tiny_fmt):
    path = write(tmp_path, [GOOD_SFT, {"id": "b", "prompt": "Repeat the word stone 2 times.", "completion": "stone stone"}])
    kept, report = v.load_sft(path, tiny_fmt)
    assert report.n_kept == 2
    assert kept[0]["encoded"] == tiny_fmt.encode(GOOD_SFT["messages"])
    assert kept[1]["id"] == "b" and kept[1]["_line"] == 2
    assert kept[1]["encoded"].input_ids == tiny_fmt.encode(kept[1]["messages"]).input_ids


def test_preference_length_is_measured_with_the_chat_format(tmp_path, tiny_fmt):
    path = write(tmp_path, [GOOD_PREF])
    n = max(len(tiny_fmt.encode_preference(GOOD_PREF["prompt"], GOOD_PREF[k])) for k in ("chosen", "rejected"))
    assert v.load_preferences(path, tiny_fmt, max_length=n)[1].n_kept == 1
    assert v.load_preferences(path, tiny_fmt, max_length=n - 1)[1].counts == {v.OVERLONG: 1}


def test_many_defects_in_one_file_and_the_report(tmp_path, tiny_fmt):
    lines = [GOOD_PREF, "{oops", {"prompt": "q", "chosen": "x", "rejected": "x"}, {"prompt": "q", "chosen": "y", "rejected": "x"},
             {"prompt": "q", "chosen": "x", "rejected": "x"}, {"prompt": "q", "chosen": "z", "rejected": "x"},
             {"prompt": "q", "chosen": "x", "rejected": " x"}, {"prompt": "q", "chosen": "x", "rejected": "x "}]
    path = write(tmp_path, lines)
    kept, report = v.load_preferences(path, tiny_fmt)
    assert (report.n_in, report.n_kept, report.n_rejected) == (8, 3, 5)
    assert report.counts == {v.INVALID_JSON: 1, v.CHOSEN_EQUALS_REJECTED: 4}
    assert [e[1] for e in report.examples[v.CHOSEN_EQUALS_REJECTED]] == [3, 5, 7]  # at most 3 examples
    text = report.lines()
    assert text[0] == f"{path}: 8 records: 3 kept, 5 rejected"
    assert f"{path}:3: chosen_equals_rejected: chosen and rejected are identical" in text
    assert f"{path}: chosen_equals_rejected: ... and 1 more" in text
    d = report.to_dict()
    assert d["n_in"] == 8 and d["counts"]["invalid_json"] == 1
    assert d["examples"]["invalid_json"][0] == {"file": path, "line": 2, "message": d["examples"]["invalid_json"][0]["message"]}
    json.dumps(d)


def test_missing_file_raises_one_line(tmp_path, tiny_fmt):
    for fn in (v.load_sft, v.load_preferences, v.load_prompts):
        with pytest.raises(DataError) as e:
            fn(str(tmp_path / "missing.jsonl"), tiny_fmt)
        assert str(e.value) == f"{tmp_path / 'missing.jsonl'}: file not found"


def test_default_task_data_is_all_kept(tmp_path, tiny_fmt):
    from data.io import write_jsonl
    from data import default_task

    data = default_task.generate(seed=1, n_sft=60, n_preference=60, n_eval_preference=20, n_eval_prompts=20,
                                 n_sampling_prompts=20)
    for name, recs in data.items():
        write_jsonl(tmp_path / f"{name}.jsonl", recs)
    evals, rep = v.load_prompts(tmp_path / "eval_prompts.jsonl", tiny_fmt)
    eval_keys = v.prompt_keys(evals) | v.prompt_keys(v.load_preferences(tmp_path / "eval_preference.jsonl", tiny_fmt)[0])
    assert len(eval_keys) == 40
    # the default task has repeated training prompts, so check each file's report rather than zero defects
    for name, fn in (("sft", v.load_sft), ("preference", v.load_preferences), ("prompts", v.load_prompts)):
        kept, report = fn(tmp_path / f"{name}.jsonl", tiny_fmt, eval_prompts=eval_keys)
        assert report.n_in == len(data[name]) == report.n_kept + report.n_rejected
        assert set(report.counts) <= {v.DUPLICATE}, report.lines()


def test_sft_record_with_completion_ids_trains_on_those_ids(tmp_path, tiny_fmt):
    """best_of_k.jsonl carries the sampled ids: SFT trains on them as sampled, never re-encoded from text."""
    from data.io import write_jsonl

    prompt = [{"role": "user", "content": "what color is a banana?"}]
    odd = tiny_fmt.text_ids("y") + tiny_fmt.text_ids("ellow") + [tiny_fmt.eot_id]  # not how "yellow" is encoded
    assert odd[:-1] != tiny_fmt.text_ids("yellow")
    recs = [{"messages": prompt + [{"role": "assistant", "content": "yellow"}], "completion_ids": odd},
            {"messages": prompt + [{"role": "assistant", "content": "yellow!"}], "completion_ids": ["x"]}]
    write_jsonl(tmp_path / "bok.jsonl", recs)
    kept, rep = v.load_sft(tmp_path / "bok.jsonl", tiny_fmt)
    enc = kept[0]["encoded"]
    assert enc.input_ids == tiny_fmt.encode_prompt(prompt) + odd
    assert enc.assistant_mask[enc.prompt_len:] == [1] * len(odd) and enc.input_ids[-1] == tiny_fmt.eot_id
    assert rep.to_dict()["counts"] == {v.BAD_TOKEN_IDS: 1}
