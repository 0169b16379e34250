"""data.formats: reading files and normalising every accepted record shape to the canonical forms."""

from __future__ import annotations

import json

import pytest

from data.formats import (DataError, iter_file, normalize_preference, normalize_prompt, normalize_sft,
                          parse_transcript, ranked_pairs)
from tests.conftest import A, S, U


# -- files ------------------------------------------------------------------------------------------------
def test_jsonl_lines_bad_json_and_bad_utf8(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"a": 1}\n\n{"a": \n[1, 2]\n{"a": "\xff"}\n{"a": 2}\n')
    items = list(iter_file(p))
    assert [line for line, _ in items] == [1, 3, 4, 5, 6]  # the blank line 2 is no record
    assert items[0] == (1, {"a": 1}) and items[-1] == (6, {"a": 2})
    assert items[1][1].startswith("invalid_json: ")
    assert items[2][1].startswith("invalid_json: expected a JSON object")
    assert items[3][1].startswith("not_utf8: byte 0xff")


def test_json_list_keeps_line_numbers(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('[\n  {"a": 1},\n  {"a": 2,\n   "b": 3},\n  {"a": 4}\n]\n')
    assert list(iter_file(p)) == [(2, {"a": 1}), (3, {"a": 2, "b": 3}), (5, {"a": 4})]


def test_json_single_object_and_one_per_line(tmp_path):
    one = tmp_path / "one.json"
    one.write_text('\n{\n "messages": []\n}\n')
    assert list(iter_file(one)) == [(2, {"messages": []})]
    lines = tmp_path / "lines.json"
    lines.write_text('{"a": 1}\n{"a": 2}\nnot json\n')
    items = list(iter_file(lines))
    assert items[:2] == [(1, {"a": 1}), (2, {"a": 2})] and items[2][0] == 3 and items[2][1].startswith("invalid_json")


def test_json_broken_list_is_one_error_at_its_line(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('[\n {"a": 1},\n {"a": }\n]')
    items = list(iter_file(p))
    assert items[0] == (2, {"a": 1})
    assert items[1][0] == 3 and items[1][1].startswith("invalid_json")


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 3), p)
    items = list(iter_file(p))
    assert [line for line, _ in items] == [1, 2, 3] and items[0][1] == {"prompt": "a", "chosen": "b", "rejected": "c"}


def test_missing_file_folder_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found$"):
        list(iter_file(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="is a folder"):
        list(iter_file(tmp_path))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type .csv"):
        list(iter_file(tmp_path / "x.csv"))


def test_hub_name_is_loaded_lazily_with_its_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return [{"prompt": "hi"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    gen = iter_file("someone/prefs:test")
    assert calls == []  # nothing happens before the records are read
    assert list(gen) == [(1, {"prompt": "hi"})] and calls == [("someone/prefs", "test")]
    assert list(iter_file("someone/prefs")) and calls[-1] == ("someone/prefs", "train")


# -- SFT --------------------------------------------------------------------------------------------------
def test_sft_messages_keep_id_category_source():
    rec = {"id": 7, "category": "upper", "source": "human", "extra": 1, "messages": [U("q"), A("a")]}
    assert normalize_sft(rec) == {"id": 7, "category": "upper", "source": "human", "messages": [U("q"), A("a")]}


def test_sft_prompt_completion_strings_and_lists():
    assert normalize_sft({"prompt": "q", "completion": "a"}) == {"messages": [U("q"), A("a")]}
    assert normalize_sft({"prompt": [S("s"), U("q")], "completion": [A("a")]}) == {"messages": [S("s"), U("q"), A("a")]}


def test_sft_hh_transcript():
    rec = {"text": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Bye now."}
    assert normalize_sft(rec)["messages"] == [U("Hi there"), A("Hello!"), U("Bye"), A("Bye now.")]


def test_sft_content_parts_are_joined_and_missing_keys_stay_missing():
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                        {"content": "no role"}]}
    assert normalize_sft(rec)["messages"] == [U("ab"), {"content": "no role"}]


def test_sft_unknown_shape():
    with pytest.raises(DataError, match="not an SFT record") as e:
        normalize_sft({"question": "q"})
    assert e.value.code == "unknown_format"
    with pytest.raises(DataError, match="expected a string or a list of messages"):
        normalize_sft({"messages": [1, 2]})


# -- preferences ------------------------------------------------------------------------------------------
def test_trl_explicit_prompt_strings():
    rec = {"id": "x", "prompt": "What color is the sky?", "chosen": "Blue.", "rejected": "Green."}
    assert normalize_preference(rec) == {"id": "x", "prompt": [U("What color is the sky?")],
                                         "chosen": [A("Blue.")], "rejected": [A("Green.")]}


def test_trl_explicit_prompt_messages():
    rec = {"prompt": [S("Be brief."), U("Sky?")], "chosen": [A("Blue.")], "rejected": [A("Green.")]}
    assert normalize_preference(rec) == {"prompt": [S("Be brief."), U("Sky?")], "chosen": [A("Blue.")],
                                         "rejected": [A("Green.")]}


def test_trl_implicit_prompt():
    rec = {"chosen": [U("Hi"), A("Hello"), U("Sky?"), A("Blue.")],
           "rejected": [U("Hi"), A("Hello"), U("Sky?"), A("Green.")]}
    out = normalize_preference(rec)
    assert out == {"prompt": [U("Hi"), A("Hello"), U("Sky?")], "chosen": [A("Blue.")], "rejected": [A("Green.")]}


def test_implicit_identical_conversations_give_identical_responses_not_empty_ones():
    conv = [U("Sky?"), A("Blue.")]
    out = normalize_preference({"chosen": conv, "rejected": list(conv)})
    assert out["prompt"] == [U("Sky?")] and out["chosen"] == out["rejected"] == [A("Blue.")]


def test_hh_rlhf():
    rec = {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.", "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5."}
    assert normalize_preference(rec) == {"prompt": [U("What is 2+2?")], "chosen": [A("4.")], "rejected": [A("5.")]}


def test_hh_prompt_waiting_for_its_answer():
    rec = {"prompt": "\n\nHuman: What is 2+2?\n\nAssistant:", "chosen": " 4.", "rejected": " 5."}
    out = normalize_preference(rec)
    assert out["prompt"] == [U("What is 2+2?")] and out["chosen"] == [A(" 4.")]
    assert parse_transcript("Human: a\n\nAssistant: b") == [U("a"), A("b")]
    with pytest.raises(DataError, match="HH-RLHF"):
        parse_transcript("preamble\n\nHuman: a")


def test_plain_strings_without_prompt_are_refused():
    with pytest.raises(DataError, match="no 'prompt'"):
        normalize_preference({"chosen": "The sky is blue.", "rejected": "The sky is green."})


def test_ultrafeedback_completions_best_and_worst():
    rec = {"prompt": "Sky?", "source": "evol", "completions": [
        {"response": "Green.", "overall_score": 3.0}, {"response": "Blue.", "overall_score": 9.5},
        {"response": "Red.", "overall_score": 1.0}, {"response": "Maybe blue.", "overall_score": 7}]}
    assert normalize_preference(rec) == {"source": "evol", "prompt": [U("Sky?")], "chosen": [A("Blue.")],
                                         "rejected": [A("Red.")], "score_chosen": 9.5, "score_rejected": 1.0}
    rec = {"instruction": "Sky?", "completions": [{"response": "Green.", "score": 2}, {"response": "Blue.", "score": 4}]}
    out = normalize_preference(rec)
    assert out["chosen"] == [A("Blue.")] and out["rejected"] == [A("Green.")]


def test_ultrafeedback_tied_or_bad_scores():
    tied = {"prompt": "Sky?", "completions": [{"response": "a", "score": 5}, {"response": "b", "score": 5}]}
    with pytest.raises(DataError, match="same score") as e:
        normalize_preference(tied)
    assert e.value.code == "tied_scores"
    with pytest.raises(DataError, match="numeric"):
        normalize_preference({"prompt": "Sky?", "completions": [{"response": "a"}, {"response": "b", "score": 1}]})
    with pytest.raises(DataError, match="needs two"):
        normalize_preference({"prompt": "Sky?", "completions": [{"response": "a", "score": 1}]})


def test_ultrafeedback_binarized():
    rec = {"prompt": "Sky?", "prompt_id": "p1", "chosen": [U("Sky?"), A("Blue.")], "rejected": [U("Sky?"), A("Green.")],
           "messages": [U("Sky?"), A("Blue.")], "score_chosen": 9.0, "score_rejected": 2.0}
    assert normalize_preference(rec) == {"prompt": [U("Sky?")], "chosen": [A("Blue.")], "rejected": [A("Green.")],
                                         "score_chosen": 9.0, "score_rejected": 2.0}


def test_ranked_three_responses_and_id_fields_untouched():
    rec = {"id": "pref-1", "category": "repeat", "prompt": [U("q")], "edited": [A("e")], "chosen": [A("c")],
           "rejected": [A("r")], "prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5]}
    out = normalize_preference(rec)
    assert out == rec
    assert out["prompt_ids"] is rec["prompt_ids"]


def test_missing_rejected_is_unknown_format():
    with pytest.raises(DataError, match="missing 'rejected'") as e:
        normalize_preference({"prompt": "q", "chosen": "a"})
    assert e.value.code == "unknown_format"


def test_ranked_pairs_counts_and_order():
    three = {"prompt": [U("q")], "edited": [A("e")], "chosen": [A("c")], "rejected": [A("r")]}
    assert ranked_pairs(three) == [("edited", "chosen"), ("edited", "rejected"), ("chosen", "rejected")]
    assert ranked_pairs({"prompt": [U("q")], "chosen": [A("c")], "rejected": [A("r")]}) == [("chosen", "rejected")]
    assert ranked_pairs({"prompt": [U("q")], "edited": None, "chosen": [A("c")], "rejected": [A("r")]}) == [("chosen", "rejected")]


def test_default_task_records_are_already_canonical():
    from data import default_task

    data = default_task.generate(seed=3, n_sft=20, n_preference=30, n_eval_preference=5, n_eval_prompts=5,
                                 n_sampling_prompts=5)
    for rec in data["sft"]:
        assert normalize_sft(rec) == rec
    for rec in data["preference"]:
        assert normalize_preference(rec) == rec
        assert len(ranked_pairs(rec)) == (3 if "edited" in rec else 1)
    for rec in data["prompts"]:
        assert normalize_prompt(rec) == rec
    json.dumps(data)  # canonical records are plain JSON


# -- prompts ----------------------------------------------------------------------------------------------
def test_prompt_forms():
    assert normalize_prompt({"id": 3, "prompt": "q"}) == {"id": "3", "prompt": [U("q")]}
    assert normalize_prompt({"messages": [S("s"), U("q"), A("a")]}, default_id="f-1") == {"id": "f-1", "prompt": [S("s"), U("q")]}
    with pytest.raises(DataError, match="not a prompt record"):
        normalize_prompt({"text": "q"})


def test_byte_order_mark_is_ignored(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n{"a": 2}\n')
    assert list(iter_file(p)) == [(1, {"a": 1}), (2, {"a": 2})]
    q = tmp_path / "bom.json"
    q.write_bytes(b'\xef\xbb\xbf[{"a": 1}]')
    assert list(iter_file(q)) == [(1, {"a": 1})]


def test_implicit_conversations_without_a_shared_prompt():
    with pytest.raises(DataError, match="share no prompt") as e:
        normalize_preference({"chosen": [U("a"), A("b")], "rejected": [U("c"), A("d")]})
    assert e.value.code == "empty_response"


def test_preference_margin_field_is_kept():
    """Llama 2 style margins travel to the reward stage (used when reward.margin is on)."""
    rec = normalize_preference({"prompt": "Hi", "chosen": "Hello", "rejected": "Go away", "margin": 2.0})
    assert rec["margin"] == 2.0
