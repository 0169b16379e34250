"""data.chat_format, llama3.1 (Llama 3.1/3.2/3.3 Instruct): Meta's 3.1 template byte for byte, on the real 128k
vocabulary with 3.1's special-token names; exact ids and masks; <|eom_id|> end to end; tool records in the
validator; the template hash that keeps the two families apart.

The reference is CHAT_TEMPLATE_31 (our transcription of Meta's Jinja) rendered by transformers'
apply_chat_template, which is what HF and vLLM users of a Llama 3.1 folder get."""

from __future__ import annotations

import json

import pytest

from data.chat_format import (CHAT_TEMPLATE, CHAT_TEMPLATE_31, ChatFormat, ChatFormatError, Encoded, chat_template,
                              load_tokenizer, render, saved_chat_template, template_family, tool_args)
from tests.conftest import A, S, U

BOS_ID, EOS_ID, PAD_ID, START_ID, END_ID, EOM_ID, EOT_ID, PYTHON_TAG_ID = 128000, 128001, 128004, 128006, 128007, 128008, 128009, 128010


def CALL(name, **arguments):  # the HF convention for an assistant's tool call
    return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


def IPY(text, role="ipython"):
    return {"role": role, "content": text}


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather — météo ☀",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
# (messages, template arguments): every kind of turn the 3.1 template writes
CONVERSATIONS = {
    "no_system": ([U("Hi"), A("Hello!")], {}),
    "system_multi_turn": ([S("You are terse."), U("2+2?"), A("4"), U("And 3+3?"), A("6")], {}),
    "custom_tool_and_ipython": ([U("Weather in Paris?"), CALL("get_weather", city="Paris"), IPY('{"temp_c": 21}'),
                                 A("It is 21 °C in Paris.")], {"tools": [WEATHER]}),
    "builtin_tool_eom": ([S("Be brief."), U("Who won the 2022 World Cup?"), CALL("brave_search", query="2022 World Cup winner"),
                          IPY("Argentina won.", role="tool"), A("Argentina.")], {"builtin_tools": ["brave_search", "wolfram_alpha"]}),
    "trailing_whitespace": ([S("  padded system \n"), U("\n question  "), A("  answer\t\n"), U("again "), A(" \u00a0 ok ")], {}),
    "emoji_multilingual": ([S("Réponds en français 😀"), U("Wie geht's? 你好吗？ Как дела? 👍🏽"),
                            A("Très bien — ça va ! 我很好。 ✓ naïve café 🎉"),
                            U("Code:\n```python\ndef f(x):\n    return x ** 2  # 12345678\n```\n\nExplain."),
                            A("!!! It squares x.\n\n- 1\r\n\nDone...")], {}),
    "tools_whitespace_and_code_interpreter": ([S(" sys "), U("  Weather?  "), CALL("get_weather", city="Zürich"),
                                               IPY(" 18 degrees "), A("18.")],
                                              {"tools": [WEATHER], "builtin_tools": ["code_interpreter", "wolfram_alpha"]}),
}
IDS = list(CONVERSATIONS)


def jinja(fmt, messages, add_generation_prompt=False, **kw):
    return fmt.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=CHAT_TEMPLATE_31, **kw)


# -- the template, byte for byte ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", IDS)
def test_render_is_metas_31_template(llama31_fmt, name):
    messages, kw = CONVERSATIONS[name]
    assert render(messages, template="llama3.1", **kw) == jinja(llama31_fmt, messages, **kw)
    assert llama31_fmt.render(messages, **kw) == jinja(llama31_fmt, messages, **kw)
    prompt = messages[:-1]
    assert render(prompt, True, "llama3.1", **kw) == jinja(llama31_fmt, prompt, add_generation_prompt=True, **kw)
    # another date: the recipe's model.template_date, as Meta's date_string
    assert render(messages, template="llama3.1", date="1 Jan 2025", **kw) == jinja(llama31_fmt, messages, date_string="1 Jan 2025", **kw)


def test_the_31_system_header_rules(llama31_fmt):
    assert render([U("Hi")], template="llama3.1") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>")
    text = render([S("  Be nice. "), U("Hi")], template="llama3.1", tools=[WEATHER])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
                           "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe nice.<|eot_id|>")
    # tools go into the first user message; a tool output is a JSON string (Meta's tojson of a string)
    assert "Do not use variables.\n\n{\n    \"type\": \"function\"," in text and text.endswith("}\n\nHi<|eot_id|>")
    assert render([U("q"), IPY("42")], template="llama3.1").endswith('<|start_header_id|>ipython<|end_header_id|>\n\n"42"<|eot_id|>')
    with pytest.raises(ChatFormatError, match="first user message"):
        render([S("x")], template="llama3.1", tools=[WEATHER])
    with pytest.raises(ChatFormatError, match="exactly one tool call"):
        render([U("q"), {"role": "assistant", "content": "", "tool_calls": [CALL("a")["tool_calls"][0]] * 2}], template="llama3.1")
    with pytest.raises(ChatFormatError, match="llama3.1"):
        render([U("q"), CALL("a")])  # the 3.0 template has no tool calls


# -- ids and masks on the real vocabulary -------------------------------------------------------------------
@pytest.mark.parametrize("name", IDS)
def test_segment_ids_equal_tokenizing_the_rendered_string(llama31_fmt, name):
    messages, kw = CONVERSATIONS[name]
    tok = llama31_fmt.tokenizer
    enc = llama31_fmt.encode(messages, **kw)
    assert enc.input_ids == tok(render(messages, template="llama3.1", **kw), add_special_tokens=False)["input_ids"]
    assert enc.input_ids.count(BOS_ID) == 1 and enc.input_ids[0] == BOS_ID
    assert len(enc.assistant_mask) == len(enc.special_mask) == len(enc)
    prompt = llama31_fmt.encode_prompt(messages[:-1], **kw)
    assert prompt == tok(render(messages[:-1], True, "llama3.1", **kw), add_special_tokens=False)["input_ids"]
    assert enc.input_ids[: len(prompt)] == prompt and enc.prompt_len == len(prompt)  # prompt ids are a prefix
    assert prompt.count(BOS_ID) == 1


def test_exact_ids_and_masks_of_a_builtin_tool_conversation(llama31_fmt):
    """Built piece by piece here (not from the module's segments): what is trained, what is formatting."""
    f = llama31_fmt
    messages, kw = CONVERSATIONS["builtin_tool_eom"]
    ids, trained, special = [], [], []

    def put(piece, t, s):
        ids.extend(piece)
        trained.extend([t] * len(piece))
        special.extend([s] * len(piece))

    def header(role):
        put([START_ID, *f.text_ids(role), END_ID, *f.text_ids("\n\n")], 0, 1)

    put([BOS_ID], 0, 1)
    header("system")
    put(f.text_ids("Environment: ipython\nTools: brave_search, wolfram_alpha\n\nCutting Knowledge Date: December 2023\n"
                   "Today Date: 26 Jul 2024\n\n"), 0, 1)  # the template's own text: formatting
    put(f.text_ids("Be brief."), 0, 0)
    put([EOT_ID], 0, 1)
    header("user")
    put(f.text_ids("Who won the 2022 World Cup?"), 0, 0)
    put([EOT_ID], 0, 1)
    header("assistant")
    put([PYTHON_TAG_ID] + f.text_ids('brave_search.call(query="2022 World Cup winner")'), 1, 0)  # the call is trained
    put([EOM_ID], 1, 1)  # ... and its stop token: eom, trained, formatting
    header("ipython")  # the `tool` role renders as ipython
    put(f.text_ids('"Argentina won."'), 0, 0)
    put([EOT_ID], 0, 1)
    header("assistant")
    prompt_len = len(ids)
    put(f.text_ids("Argentina."), 1, 0)
    put([EOT_ID], 1, 1)
    enc = f.encode(messages, **kw)
    assert (enc.input_ids, enc.assistant_mask, enc.special_mask, enc.prompt_len) == (ids, trained, special, prompt_len)
    assert enc.input_ids.count(EOM_ID) == 1 and enc.input_ids.count(PYTHON_TAG_ID) == 1
    assert f.decode([t for t, a in zip(enc.input_ids, enc.assistant_mask) if a]) == 'brave_search.call(query="2022 World Cup winner")Argentina.'


def test_a_custom_tool_call_is_trained_and_ends_in_eot(llama31_fmt):
    messages, kw = CONVERSATIONS["custom_tool_and_ipython"]
    enc = llama31_fmt.encode(messages[:2], **kw)  # ends with the call
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert enc.input_ids[enc.prompt_len:] == llama31_fmt.text_ids(call) + [EOT_ID]
    assert enc.assistant_mask[enc.prompt_len:] == [1] * (len(enc) - enc.prompt_len)
    assert sum(enc.assistant_mask) == len(enc) - enc.prompt_len  # nothing before it is trained (tool schemas neither)


def test_format_ids_of_the_two_families(llama31_fmt, llama3_fmt):
    assert llama31_fmt.stop_ids == [EOT_ID, EOM_ID, EOS_ID] and llama31_fmt.turn_end_ids == (EOT_ID, EOM_ID)
    assert EOM_ID in llama31_fmt.formatting_ids and PYTHON_TAG_ID not in llama31_fmt.formatting_ids
    assert llama31_fmt.pad_id == PAD_ID and llama31_fmt.pad_token == "<|finetune_right_pad_id|>"
    assert llama3_fmt.stop_ids == [EOT_ID, EOS_ID] and EOM_ID not in llama3_fmt.formatting_ids
    assert llama31_fmt.roles == ("system", "user", "assistant", "ipython", "tool") and llama3_fmt.roles == ("system", "user", "assistant")


# -- eom end to end: a sampled candidate that stopped on <|eom_id|> -------------------------------------------
def test_a_completion_that_stops_on_eom_keeps_it(llama31_fmt):
    from sampling.engine import normalize_completion

    f = llama31_fmt
    messages, kw = CONVERSATIONS["builtin_tool_eom"]
    prompt = messages[:2]
    call = [PYTHON_TAG_ID] + f.text_ids('brave_search.call(query="2022 World Cup winner")')
    # vLLM stops on eom (a stop id of llama3.1), with the stop token in the output or left out of it
    for out, reason in ((call + [EOM_ID], None), (call, EOM_ID)):
        ids, truncated = normalize_completion(out, "stop", f.eot_id, f.stop_ids, f.turn_end_ids, reason)
        assert ids == call + [EOM_ID] and not truncated  # never ...<|eom_id|><|eot_id|>
    enc = f.encode_completion(prompt, call + [EOM_ID], **kw)
    assert enc == f.encode(prompt + [messages[2]], **kw)  # the same sequence as the record's tool call
    assert enc.input_ids[-1] == EOM_ID and enc.assistant_mask[-1] == 1 and enc.special_mask[-1] == 1
    assert enc.completion_mask(mask_special_tokens=False)[-1] == 1  # SFT/NLL: eom trained as its stop token
    assert enc.completion_mask(mask_special_tokens=True)[-1] == 0  # DPO: formatting masked
    # a record carrying the candidate's ids and its tools encodes the same way (DPO's pairs.jsonl)
    rec = {"prompt": prompt, "chosen": [messages[2]], "chosen_ids": call + [EOM_ID], **kw}
    assert f.encode_response(rec, "chosen") == enc and tool_args(rec) == kw


# -- identity: the hash keeps the families apart --------------------------------------------------------------
def test_template_hash_differs_between_families_and_dates(llama31_fmt, tmp_path):
    tok = llama31_fmt.tokenizer
    h31 = ChatFormat(tok, template="llama3.1").template_hash()
    h3 = ChatFormat(tok, template="llama3").template_hash()
    other_day = ChatFormat(tok, template="llama3.1", date="1 Jan 2025").template_hash()
    ChatFormat(tok, template="llama3.1")  # leave the shared fixture's tokenizer as it was
    assert len({h31, h3, other_day}) == 3
    from core.runs import StageRun, TemplateMismatch

    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "manifest.json").write_text(json.dumps({"template_hash": h3}))
    with pytest.raises(TemplateMismatch):  # a stage refuses an input made with the other family
        StageRun(tmp_path / "s", "sft", {}, {}, h31).check_template(tmp_path / "up")


def test_llama31_needs_the_31_token_names(llama3_dir):
    with pytest.raises(ChatFormatError, match=r"needs <\|eom_id\|>.*tokenizer `llama3.1`"):
        load_tokenizer(llama3_dir, "llama3.1")
    with pytest.raises(ChatFormatError, match="unknown chat template 'llama3.2'"):
        load_tokenizer(llama3_dir, "llama3.2")


# -- tokenizer names and the saved template ------------------------------------------------------------------
def test_tokenizer_names(llama3_fmt, llama31_fmt):
    """`llama3` and `llama3.1` are Meta's vocabulary with 3.0's and 3.1's special-token names: same text ids."""
    v3, v31 = llama3_fmt.tokenizer.get_vocab(), llama31_fmt.tokenizer.get_vocab()
    assert len(v3) == len(v31) == 128256
    assert v31["<|eom_id|>"] == v3["<|reserved_special_token_4|>"] == EOM_ID
    assert v31["<|python_tag|>"] == PYTHON_TAG_ID and v31["<|reserved_special_token_3|>"] == 128011
    assert v31["<|reserved_special_token_247|>"] == 128255 and "<|reserved_special_token_248|>" not in v31
    text = "Wie geht's? 你好吗 12345 <|eot_id|>"
    assert llama31_fmt.text_ids(text) == llama3_fmt.text_ids(text)
    assert load_tokenizer("llama3").template == "llama3" and llama31_fmt.template == "llama3.1"


def test_the_saved_template_carries_family_and_date(llama31_fmt, tmp_path):
    fmt = ChatFormat(llama31_fmt.tokenizer, template="llama3.1", date="1 Jan 2025")
    fmt.tokenizer.save_pretrained(str(tmp_path))
    ChatFormat(llama31_fmt.tokenizer, template="llama3.1")
    saved = saved_chat_template(tmp_path)
    assert saved == chat_template("llama3.1", "1 Jan 2025") and template_family(saved) == ("llama3.1", "1 Jan 2025")
    back = load_tokenizer(tmp_path)  # no template given: the folder's own
    assert (back.template, back.date) == ("llama3.1", "1 Jan 2025")
    # HF/vLLM users of the folder render the recipe's date without passing one
    messages = CONVERSATIONS["no_system"][0]
    assert back.tokenizer.apply_chat_template(messages, tokenize=False) == render(messages, template="llama3.1", date="1 Jan 2025")
    assert template_family(CHAT_TEMPLATE) == ("llama3", None) and template_family("{{ messages }}") is None
    assert template_family(CHAT_TEMPLATE_31) == ("llama3.1", "26 Jul 2024")


# -- the validator takes 3.1 records ------------------------------------------------------------------------
def test_validator_takes_tool_records_under_llama31_only(llama31_fmt, llama3_fmt, tmp_path):
    from data import validate as v

    good = [{"messages": msgs, **kw} for name, (msgs, kw) in CONVERSATIONS.items() if kw]
    bad = {
        "two_calls": {"messages": [U("q"), {"role": "assistant", "content": "", "tool_calls": CALL("a")["tool_calls"] * 2}, IPY("x"), A("y")]},
        "call_on_user": {"messages": [{**U(""), "tool_calls": CALL("a")["tool_calls"]}, A("y")]},
        "call_and_content": {"messages": [U("q"), {**CALL("a", k="v"), "content": "I will call a."}, IPY("x"), A("y")]},
        "builtin_args_not_strings": {"messages": [U("q"), CALL("brave_search", query=3), IPY("x"), A("y")], "builtin_tools": ["brave_search"]},
        "ipython_first": {"messages": [IPY("x"), A("y")]},
        "ipython_after_user": {"messages": [U("q"), IPY("x"), A("y")]},
    }
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good + list(bad.values())))
    kept, report = v.load_sft(path, llama31_fmt, max_length=4096)
    assert len(kept) == len(good)
    assert report.counts == {"bad_tool_call": 4, "bad_role_order": 2}
    for r in kept:  # encoded with the record's tools
        assert r["encoded"] == llama31_fmt.encode(r["messages"], **tool_args(r))
    _, report3 = v.load_sft(path, llama3_fmt, max_length=4096)
    assert report3.n_kept == 0 and report3.counts["unknown_role"] >= 3  # ipython/tool need llama3.1
    assert "need model.chat_template: llama3.1" in report3.examples["unknown_role"][0][2]


def test_preferences_and_prompts_with_tools(llama31_fmt, tmp_path):
    from data import validate as v

    messages, kw = CONVERSATIONS["builtin_tool_eom"]
    pref = {"prompt": messages[:2], "chosen": [messages[2]], "rejected": [A("I do not know.")], **kw}
    prompt = {"id": "p1", "prompt": messages[:4], **kw}  # ends with the tool's output: the model answers it
    (tmp_path / "pref.jsonl").write_text(json.dumps(pref) + "\n")
    (tmp_path / "prompts.jsonl").write_text(json.dumps(prompt) + "\n")
    kept, report = v.load_preferences(tmp_path / "pref.jsonl", llama31_fmt)
    assert report.n_kept == 1 and kept[0]["builtin_tools"] == kw["builtin_tools"]
    assert llama31_fmt.encode_response(kept[0], "chosen").input_ids[-1] == EOM_ID
    kept, report = v.load_prompts(tmp_path / "prompts.jsonl", llama31_fmt)
    assert report.n_kept == 1 and kept[0]["builtin_tools"] == kw["builtin_tools"]


def test_the_30_format_is_unchanged(llama3_fmt):
    """The llama3 family renders, encodes and hashes as before the 3.1 family came."""
    messages = [S("You are helpful."), U("Hi"), A("Hello!")]
    assert render(messages) == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
                                "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                                "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")
    assert isinstance(llama3_fmt.encode(messages), Encoded) and llama3_fmt.tokenizer.chat_template == CHAT_TEMPLATE
