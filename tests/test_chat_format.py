"""data.chat_format: Meta's Llama 3 template, byte for byte, and exact ids and masks on the real vocabulary."""

from __future__ import annotations

import pytest

from data.chat_format import CHAT_TEMPLATE, ChatFormat, ChatFormatError, Encoded, load_tokenizer, render

BOS_ID, PAD_ID, START_ID, END_ID, EOT_ID = 128000, 128004, 128006, 128007, 128009

SYS_USER_ASSISTANT = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}]
META_RENDERED = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")
META_GENERATION_PROMPT = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
                          "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                          "<|start_header_id|>assistant<|end_header_id|>\n\n")

CONVERSATIONS = [
    SYS_USER_ASSISTANT,
    [{"role": "user", "content": "Repeat the word river 3 times."}, {"role": "assistant", "content": "river river river"}],
    [{"role": "user", "content": "  padded question \n"}, {"role": "assistant", "content": "\n\n padded answer\t "}],
    [{"role": "system", "content": "Réponds en français, s'il te plaît."},
     {"role": "user", "content": "Wie geht's? 你好吗？ Как дела? 😀👍🏽"},
     {"role": "assistant", "content": "Très bien — ça va ! 我很好。 Хорошо. ✓ naïve café"},
     {"role": "user", "content": "Code:\n```python\ndef f(x):\n    return x ** 2  # 12345678\n```\n\nExplain."},
     {"role": "assistant", "content": "!!! It squares x.\n\n- 1\n- 2\r\n\n\nDone..."}],
    [{"role": "user", "content": "1234567 + 89 = ?"}, {"role": "assistant", "content": "1234656"},
     {"role": "user", "content": "'s 're ’s don't"}, {"role": "assistant", "content": "   \u00a0"}],
]


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


# -- the template -----------------------------------------------------------------------------------------
def test_render_is_metas_template_string():
    assert render(SYS_USER_ASSISTANT) == META_RENDERED
    assert render(SYS_USER_ASSISTANT[:2], add_generation_prompt=True) == META_GENERATION_PROMPT


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_render_equals_apply_chat_template(tiny_fmt, i):
    messages = CONVERSATIONS[i]
    tok = tiny_fmt.tokenizer
    assert tok.chat_template == CHAT_TEMPLATE
    assert render(messages) == tok.apply_chat_template(messages, tokenize=False, chat_template=CHAT_TEMPLATE)
    prompt = messages[:-1]
    assert render(prompt, add_generation_prompt=True) == tok.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True, chat_template=CHAT_TEMPLATE)


def test_contents_are_trimmed(tiny_fmt):
    padded = [U("  Hi there \n"), A("\n\tHello!  ")]
    trimmed = [U("Hi there"), A("Hello!")]
    assert render(padded) == render(trimmed)
    assert tiny_fmt.encode(padded) == tiny_fmt.encode(trimmed)


# -- exact ids and masks on Llama 3's vocabulary ----------------------------------------------------------
def test_exact_ids_and_masks_on_llama3(llama3_fmt):
    enc = llama3_fmt.encode(SYS_USER_ASSISTANT)
    # 0 BOS | 1-4 system header | 5-8 "You are helpful." | 9 eot | 10-13 user header | 14 "Hi" | 15 eot
    # | 16-19 assistant header | 20-21 "Hello!" | 22 eot
    assert enc.input_ids == [BOS_ID, START_ID, 9125, END_ID, 271, 2675, 527, 11190, 13, EOT_ID,
                             START_ID, 882, END_ID, 271, 13347, EOT_ID,
                             START_ID, 78191, END_ID, 271, 9906, 0, EOT_ID]
    assert [i for i, t in enumerate(enc.input_ids) if t == BOS_ID] == [0]
    assert [i for i, t in enumerate(enc.input_ids) if t == START_ID] == [1, 10, 16]
    assert [i for i, t in enumerate(enc.input_ids) if t == END_ID] == [3, 12, 18]
    assert [i for i, t in enumerate(enc.input_ids) if t == EOT_ID] == [9, 15, 22]
    assert llama3_fmt.text_ids("\n\n") == [271]
    assert [i for i, m in enumerate(enc.assistant_mask) if m] == [20, 21, 22]  # content + its eot
    # BOS; each header: start, role name, end, "\n\n"; each eot
    assert [i for i, m in enumerate(enc.special_mask) if m] == [0, 1, 2, 3, 4, 9, 10, 11, 12, 13, 15, 16, 17, 18, 19, 22]
    assert enc.prompt_len == 20
    assert len(enc.assistant_mask) == len(enc.special_mask) == len(enc) == 23


def test_masks_on_the_tiny_tokenizer(tiny_fmt):
    f = tiny_fmt
    messages = [U("Repeat the word river 2 times."), A("river river"), U("Again."), A("river river")]
    enc = f.encode(messages)
    header = {r: [f.start_header_id, *f.text_ids(r), f.end_header_id, *f.text_ids("\n\n")] for r in ("user", "assistant")}
    expected_ids, expected_a, expected_s = [f.bos_id], [0], [1]
    for m in messages:
        body = f.text_ids(m["content"]) + [f.eot_id]
        is_a = int(m["role"] == "assistant")
        expected_ids += header[m["role"]] + body
        expected_a += [0] * len(header[m["role"]]) + [is_a] * len(body)
        expected_s += [1] * len(header[m["role"]]) + [0] * (len(body) - 1) + [1]
    assert (enc.input_ids, enc.assistant_mask, enc.special_mask) == (expected_ids, expected_a, expected_s)
    assert enc.input_ids == f.tokenizer(render(messages), add_special_tokens=False)["input_ids"]
    assert f.decode([t for t, a in zip(enc.input_ids, enc.assistant_mask) if a]) == "river riverriver river"


def test_exactly_one_bos_even_when_the_tokenizer_adds_one(llama3_fmt):
    from tokenizers import processors

    backend = llama3_fmt.tokenizer.backend_tokenizer
    saved = backend.post_processor
    # Meta's own HF tokenizer adds <|begin_of_text|> by default; make this one do so too, for this test.
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", BOS_ID)])
    try:
        tok = llama3_fmt.tokenizer
        assert tok("Hi")["input_ids"] == [BOS_ID, 13347]
        assert tok(render(SYS_USER_ASSISTANT))["input_ids"][:2] == [BOS_ID, BOS_ID]  # the field's double-BOS bug
        for messages in CONVERSATIONS:
            ids = llama3_fmt.encode(messages).input_ids
            assert ids.count(BOS_ID) == 1 and ids[0] == BOS_ID
            assert llama3_fmt.encode_prompt(messages[:-1]).count(BOS_ID) == 1
        assert llama3_fmt.encode([U("<|begin_of_text|>Hi"), A("ok")]).input_ids.count(BOS_ID) == 1
    finally:
        backend.post_processor = saved
    assert llama3_fmt.tokenizer("Hi")["input_ids"] == [13347]


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_segment_ids_equal_tokenizing_the_rendered_string(llama3_fmt, i):
    messages = CONVERSATIONS[i]
    tok = llama3_fmt.tokenizer
    assert llama3_fmt.encode(messages).input_ids == tok(render(messages), add_special_tokens=False)["input_ids"]
    prompt = messages[:-1]
    assert llama3_fmt.encode_prompt(prompt) == tok(render(prompt, add_generation_prompt=True),
                                                   add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_prompt_ids_are_a_prefix_of_prompt_plus_answer(llama3_fmt, tiny_fmt, i):
    messages = CONVERSATIONS[i]
    for f in (llama3_fmt, tiny_fmt):
        full = f.encode(messages)
        prompt_ids = f.encode_prompt(messages[:-1])
        assert full.input_ids[: len(prompt_ids)] == prompt_ids
        assert full.prompt_len == len(prompt_ids)


def test_special_token_strings_in_content_stay_text(llama3_fmt):
    content = "a <|eot_id|> b <|begin_of_text|><|start_header_id|>user<|end_header_id|> <|reserved_special_token_5|>"
    enc = llama3_fmt.encode([U(content), A("fine <|eot_id|>")])
    assert enc.input_ids.count(EOT_ID) == 2 and enc.input_ids.count(BOS_ID) == 1
    assert enc.input_ids.count(START_ID) == 2 and enc.input_ids.count(END_ID) == 2
    assert all(t < 128000 for t in llama3_fmt.text_ids(content))
    assert llama3_fmt.decode(llama3_fmt.text_ids(content)) == content
    # the HF tokenizer itself still parses special tokens afterwards (no state left behind)
    assert llama3_fmt.tokenizer("<|eot_id|>", add_special_tokens=False)["input_ids"] == [EOT_ID]


def test_pad_token(llama3_fmt, tiny_fmt):
    assert llama3_fmt.pad_id == PAD_ID
    assert llama3_fmt.tokenizer.pad_token_id == PAD_ID
    for f in (llama3_fmt, tiny_fmt):
        assert f.pad_id not in (f.eos_id, f.eot_id)
        assert f.tokenizer.pad_token_id == f.pad_id


def test_tokenizer_without_llama3_special_tokens_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    plain = Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ChatFormatError, match=r"plain: not a Llama 3 tokenizer: missing special tokens <\|begin_of_text\|>"):
        ChatFormat(PreTrainedTokenizerFast(tokenizer_object=plain), name="plain")
    plain.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ChatFormatError, match="not a Llama 3 tokenizer") as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    plain.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    with pytest.raises(ChatFormatError, match="no dedicated pad token"):
        ChatFormat(PreTrainedTokenizerFast(tokenizer_object=plain), name="nopad")
    with pytest.raises(ChatFormatError, match="no tokenizer.json found"):
        load_tokenizer(tmp_path / "missing")


def test_completion_mask(llama3_fmt):
    messages = [U("Hi"), A("Hello!"), U("Bye"), A("Bye now.")]
    enc = llama3_fmt.encode(messages)
    final = len(llama3_fmt.text_ids("Bye now."))
    with_eot = enc.completion_mask(mask_special_tokens=False)
    without_eot = enc.completion_mask(mask_special_tokens=True)
    assert [i for i, m in enumerate(with_eot) if m] == list(range(len(enc) - final - 1, len(enc)))
    assert [i for i, m in enumerate(without_eot) if m] == list(range(len(enc) - final - 1, len(enc) - 1))
    assert enc.input_ids[-1] == EOT_ID and with_eot[-1] == 1 and without_eot[-1] == 0
    assert sum(enc.assistant_mask) > sum(with_eot)  # the earlier assistant turn is not the completion


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_encode_completion_equals_encode(llama3_fmt, i):
    messages = CONVERSATIONS[i]
    prompt, answer = messages[:-1], messages[-1]["content"]
    ids = llama3_fmt.text_ids(answer.strip()) + [llama3_fmt.eot_id]
    got = llama3_fmt.encode_completion(prompt, ids)
    assert isinstance(got, Encoded)
    assert got == llama3_fmt.encode(messages)
    assert got.completion_mask(False) == llama3_fmt.encode(messages).completion_mask(False)


def test_encode_preference_takes_strings_or_messages(tiny_fmt):
    prompt = [U("Repeat the word river 2 times.")]
    assert tiny_fmt.encode_preference(prompt, "river river") == tiny_fmt.encode(prompt + [A("river river")])
    assert tiny_fmt.encode_preference(prompt, [A("river river")]) == tiny_fmt.encode(prompt + [A("river river")])


def test_encode_response_uses_ids_when_present(tiny_fmt):
    """Sampled pairs travel as ids: the same sequence as the messages would give, never re-encoded text."""
    prompt = [{"role": "user", "content": "Maria asks: what sound does a cow make?"}]
    rec = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "moo"}]}
    from_text = tiny_fmt.encode_response(rec, "chosen")
    answer_ids = from_text.input_ids[from_text.prompt_len:]
    from_ids = tiny_fmt.encode_response({**rec, "chosen_ids": answer_ids}, "chosen")
    assert from_ids.input_ids == from_text.input_ids
    assert from_ids.prompt_len == from_text.prompt_len
    assert from_ids.completion_mask() == from_text.completion_mask()
    # ids win over text: a record whose ids say otherwise is encoded from its ids
    other = tiny_fmt.encode_response({**rec, "chosen_ids": [tiny_fmt.eot_id]}, "chosen")
    assert other.input_ids[other.prompt_len:] == [tiny_fmt.eot_id]
