"""The data validator: every record of a file is kept or rejected with a reason; nothing is lost silently.

    records, report = load_preferences("data/pref.jsonl", fmt, max_length=2048, eval_prompts=eval_keys)
    print("\\n".join(report.lines()))

Each defect has its own code. A rejected record is counted under the first defect found, in this order:

    invalid_json               the line is not JSON (or not a JSON object)
    not_utf8                   the line is not UTF-8
    unknown_format             the record is none of the accepted shapes (see data.formats)
    tied_scores                UltraFeedback completions all have the same score: no preference
    missing_role               a message without a role
    missing_content            a message whose content is missing or not a string
    unknown_role               a role other than system, user, assistant (llama3.1 also: ipython, tool)
    bad_role_order             system is optional and first only; then user/assistant strictly alternate,
                               starting with user (llama3.1: a tool output, ipython or tool, may follow an
                               assistant turn and is followed by one); a response holds assistant messages
                               only; a prompt ends with a user message (llama3.1: or a tool output)
    bad_tool_call              tools, built-in tools or a tool call (an assistant message's `tool_calls`) the
                               template cannot write: under llama3, not one call, not {"function": {"name",
                               "arguments": {...}}}, on a non-assistant message, or next to content
    not_ending_with_assistant  an SFT conversation whose last message is not the assistant's
    empty_response             an empty prompt or response, or a message whose content is empty/whitespace
    special_token_in_content   a Llama 3 special-token string (<|eot_id|>, <|reserved_special_token_3|>, ...)
                               inside a message's content
    chosen_equals_rejected     two ranked responses are identical (also checked after truncation)
    eval_overlap               a training or sampling prompt that is also a held-out one: SFT (every round),
                               rejection sampling and DPO check the eval prompts, the reward model its eval
                               preferences
    duplicate                  the same normalised record (or prompt id) seen earlier in the same file
    overlong                   longer than max_length tokens with the shared ChatFormat: dropped with
                               overlong="drop"; with overlong="truncate" the end is cut instead, and only a
                               record that cannot fit (its prompt alone is too long) is dropped

A record kept after truncation is also counted under ``truncated`` (not a rejection) and carries a
``"truncated"`` field; an UltraFeedback record kept without its completions that have no numeric score is
counted under ``unscored_completion`` (not a rejection either). Invariant:
``report.n_in == report.n_kept + report.n_rejected``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from data.chat_format import ROLES, TOOL_ROLES, ChatFormatError, Encoded, tool_args
from data.formats import (DataError, RANKING, iter_file, normalize_preference, normalize_prompt, normalize_sft,
                          ranked_pairs)

INVALID_JSON = "invalid_json"
NOT_UTF8 = "not_utf8"
UNKNOWN_FORMAT = "unknown_format"
TIED_SCORES = "tied_scores"
MISSING_ROLE = "missing_role"
MISSING_CONTENT = "missing_content"
UNKNOWN_ROLE = "unknown_role"
BAD_ROLE_ORDER = "bad_role_order"
NOT_ENDING_WITH_ASSISTANT = "not_ending_with_assistant"
EMPTY_RESPONSE = "empty_response"
SPECIAL_TOKEN_IN_CONTENT = "special_token_in_content"
CHOSEN_EQUALS_REJECTED = "chosen_equals_rejected"
EVAL_OVERLAP = "eval_overlap"
DUPLICATE = "duplicate"
OVERLONG = "overlong"
BAD_TOKEN_IDS = "bad_token_ids"
BAD_TOOL_CALL = "bad_tool_call"
TRUNCATED = "truncated"  # kept, not rejected
UNSCORED_COMPLETION = "unscored_completion"  # kept, without the UltraFeedback completions that have no score
KEPT_NOTES = {TRUNCATED: "kept after truncation", UNSCORED_COMPLETION: "kept without their unscored completions"}

# Any <|...|> token of Llama 3's special vocabulary: named ones and <|reserved_special_token_N|>.
SPECIAL_TOKEN_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>")
MAX_EXAMPLES = 3


class Defect(Exception):
    """Raised inside a record check: the record is rejected under `code`."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# -- the report -------------------------------------------------------------------------------------------
class Report:
    """What happened to every record of one file: kept, or rejected under one defect code."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.n_in = 0
        self.n_kept = 0
        self.n_rejected = 0
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[tuple[str, int, str]]] = {}

    def _count(self, line: int, code: str, message: str) -> None:
        self.counts[code] = self.counts.get(code, 0) + 1
        examples = self.examples.setdefault(code, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append((self.path, line, message))

    def reject(self, line: int, code: str, message: str) -> None:
        self.n_rejected += 1
        self._count(line, code, message)

    def keep(self, line: int, note: tuple[str, str] | list[tuple[str, str]] | None = None) -> None:
        """A kept record; `note` = (code, message), or a list of them, for one kept with a change (truncated)."""
        self.n_kept += 1
        for n in (note if isinstance(note, list) else [note] if note else []):
            self._count(line, *n)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "n_in": self.n_in,
            "n_kept": self.n_kept,
            "n_rejected": self.n_rejected,
            "counts": dict(sorted(self.counts.items())),
            "examples": {code: [{"file": f, "line": n, "message": m} for f, n, m in ex]
                         for code, ex in sorted(self.examples.items())},
        }

    def summary(self) -> str:
        """One line: ``N records: K kept, R rejected (code n, ...)``, for an error that refuses the file."""
        rejected = ", ".join(f"{code} {n}" for code, n in sorted(self.counts.items()) if code not in KEPT_NOTES)
        return (f"{self.n_in} records: {self.n_kept} kept, {self.n_rejected} rejected"
                + (f" ({rejected})" if rejected else ""))

    def lines(self) -> list[str]:
        """A summary line, then per code its count and up to three ``file:line: code: message`` examples."""
        out = [f"{self.path}: {self.n_in} records: {self.n_kept} kept, {self.n_rejected} rejected"]
        for code, n in sorted(self.counts.items()):
            verb = KEPT_NOTES.get(code, "rejected")
            out.append(f"{self.path}: {code}: {n} record{'s' if n != 1 else ''} {verb}")
            out += [f"{f}:{line}: {code}: {msg}" for f, line, msg in self.examples[code]]
            if n > len(self.examples[code]):
                out.append(f"{self.path}: {code}: ... and {n - len(self.examples[code])} more")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


# -- normalised text --------------------------------------------------------------------------------------
def _norm(text: str) -> str:
    """Case-folded, whitespace collapsed. Idempotent, so a key can be normalised again."""
    return " ".join(text.casefold().split())


def prompt_key(prompt_messages: list[dict] | str) -> str:
    """The text used to compare prompts across data sets (eval overlap): the non-system messages' contents,
    case-folded, whitespace collapsed. A plain string is normalised the same way, so that
    ``prompt_key("Hi  there") == prompt_key([{"role": "user", "content": "hi there"}])``."""
    if isinstance(prompt_messages, str):
        return _norm(prompt_messages)
    return _norm(" ".join(m["content"] for m in prompt_messages if m.get("role") != "system"))


def prompt_keys(records: list[dict]) -> set[str]:
    """prompt_key of every canonical record: its ``prompt``, or for SFT the messages before the last reply."""
    keys = set()
    for r in records:
        if "prompt" in r:
            keys.add(prompt_key(r["prompt"]))
        else:
            keys.add(prompt_key(_sft_prompt(r["messages"])))
    return keys


def _record_key(*parts: list[dict]) -> str:
    """Key for duplicate detection: roles and trimmed contents (case kept: "RIVER" is not "river"), and tool calls."""
    return json.dumps([[[m["role"], " ".join(m["content"].split()), *([m["tool_calls"]] if m.get("tool_calls") else [])]
                        for m in part] for part in parts], sort_keys=True)


def _sft_prompt(messages: list[dict]) -> list[dict]:
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    return messages[:last]


# -- message checks ---------------------------------------------------------------------------------------
def _check_messages(messages: list[dict], what: str, roles: tuple[str, ...] = ROLES) -> None:
    """Roles and contents present and known (`roles`: the chat format's, ChatFormat.roles)."""
    for i, m in enumerate(messages, 1):
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise Defect(MISSING_ROLE, f"{what} message {i} has no role")
        if not isinstance(m.get("content"), str):
            got = "no content" if m.get("content") is None else f"content of type {type(m['content']).__name__}"
            raise Defect(MISSING_CONTENT, f"{what} message {i} has {got}")
        if m["role"] not in roles:
            hint = " (ipython and tool turns need model.chat_template: llama3.1)" if m["role"] in TOOL_ROLES else ""
            raise Defect(UNKNOWN_ROLE, f"{what} message {i} has role {m['role']!r} (expected one of {', '.join(roles)}){hint}")


def _check_order(messages: list[dict], what: str) -> None:
    """Optional system first; then user, assistant, user, ... strictly alternating; a tool output (ipython or
    tool: only llama3.1's roles get here) may follow an assistant turn, and an assistant turn follows it."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages[start:], start):
        prev = messages[i - 1]["role"] if i > start else None
        expected = "assistant" if prev == "user" or prev in TOOL_ROLES else "user"
        if m["role"] != expected and not (prev == "assistant" and m["role"] in TOOL_ROLES):
            where = "first" if i == start else f"after {messages[i - 1]['role']}"
            raise Defect(BAD_ROLE_ORDER, f"{what} message {i + 1} is {m['role']}, expected {expected} {where}"
                         + (" (system may only come first)" if m["role"] == "system" else ""))


def _check_contents(messages: list[dict], what: str, empty_code: str = EMPTY_RESPONSE) -> None:
    for i, m in enumerate(messages, 1):
        if m.get("tool_calls"):  # its text is the call, which the template writes (checked by _check_tools)
            found = SPECIAL_TOKEN_RE.search(json.dumps(m["tool_calls"], ensure_ascii=False))
            if found:
                raise Defect(SPECIAL_TOKEN_IN_CONTENT, f"{what} message {i} ({m['role']}) has a tool call containing {found.group()}")
            continue
        if not m["content"].strip():
            raise Defect(empty_code, f"{what} message {i} ({m['role']}) is empty")
        found = SPECIAL_TOKEN_RE.search(m["content"])
        if found:
            raise Defect(SPECIAL_TOKEN_IN_CONTENT, f"{what} message {i} ({m['role']}) contains {found.group()}")


def _check_tools(rec: dict, messages: list[dict], fmt) -> None:
    """A record's tools and its messages' tool calls, as the template can write them (the call's own shape
    is checked when it is encoded: a ChatFormatError there is a bad_tool_call too)."""
    tools = tool_args(rec)
    calls = [i for i, m in enumerate(messages, 1) if m.get("tool_calls")]
    if not tools and not calls:
        return
    if fmt is None or fmt.template != "llama3.1":
        raise Defect(BAD_TOOL_CALL, "tools and tool calls need model.chat_template: llama3.1")
    if "tools" in tools and not (isinstance(tools["tools"], list) and all(isinstance(t, dict) for t in tools["tools"])):
        raise Defect(BAD_TOOL_CALL, "'tools' must be a list of JSON function schemas (objects)")
    if "builtin_tools" in tools and not (isinstance(tools["builtin_tools"], list)
                                         and all(isinstance(t, str) for t in tools["builtin_tools"])):
        raise Defect(BAD_TOOL_CALL, "'builtin_tools' must be a list of tool names")
    for i in calls:
        m = messages[i - 1]
        if m["role"] != "assistant":
            raise Defect(BAD_TOOL_CALL, f"message {i} ({m['role']}) has tool_calls; only an assistant calls tools")
        if m["content"].strip():
            raise Defect(BAD_TOOL_CALL, f"message {i} has tool_calls and content; the template writes the call only")


def _eval_keys(eval_prompts) -> set[str]:
    return {prompt_key(p) for p in eval_prompts} if eval_prompts else set()


def _check_overlong_arg(overlong: str) -> None:
    if overlong not in ("drop", "truncate"):
        raise ValueError(f"overlong must be 'drop' or 'truncate', not {overlong!r}")


# -- the loop shared by all loaders -----------------------------------------------------------------------
def _load(path, check) -> tuple[list[dict], Report]:
    """Run `check(record, line) -> (canonical record, note)` on every record; collect the kept ones."""
    report = Report(path)
    kept = []
    for line, item in iter_file(path):
        report.n_in += 1
        try:
            if isinstance(item, str):  # iter_file's "<code>: <problem>" for an unreadable line
                code, _, message = item.partition(": ")
                raise Defect(code, message)
            rec, note = check(item, line)
        except Defect as d:
            report.reject(line, d.code, d.message)
            continue
        except DataError as e:
            report.reject(line, e.code, str(e))
            continue
        except ChatFormatError as e:  # what the template cannot write: tools (the rest is checked before)
            report.reject(line, BAD_TOOL_CALL, str(e))
            continue
        except Exception as e:  # a bug or an odd value must not lose the record silently
            report.reject(line, UNKNOWN_FORMAT, f"cannot process record: {type(e).__name__}: {e}")
            continue
        report.keep(line, note)
        kept.append({**rec, "_line": line})
    assert report.n_in == report.n_kept + report.n_rejected
    return kept, report


# -- SFT --------------------------------------------------------------------------------------------------
def load_sft(path, fmt, max_length: int = 2048, overlong: str = "drop",
             eval_prompts: set[str] | None = None) -> tuple[list[dict], Report]:
    """SFT records: canonical ``{"messages"}`` plus ``"_line"`` and ``"encoded"`` (``fmt.encode(messages)``, or
    the prompt + the record's ``completion_ids`` when it has them, as rejection sampling's best_of_k.jsonl does).

    With overlong="truncate" the encoded ids are cut at max_length (no eot added at the cut, so the model
    is not taught to stop mid-sentence) and the record gets ``"truncated": True``; its messages stay whole."""
    _check_overlong_arg(overlong)
    seen: set[str] = set()
    evals = _eval_keys(eval_prompts)

    def check(raw: dict, line: int):
        rec = normalize_sft(raw)
        messages = rec["messages"]
        if not messages:
            raise Defect(EMPTY_RESPONSE, "conversation has no messages")
        _check_messages(messages, "conversation", fmt.roles)
        _check_order(messages, "conversation")
        _check_tools(rec, messages, fmt)
        if messages[-1]["role"] != "assistant":
            raise Defect(NOT_ENDING_WITH_ASSISTANT, f"conversation ends with {messages[-1]['role']}, not assistant")
        _check_contents(messages, "conversation")
        if evals and prompt_key(_sft_prompt(messages)) in evals:
            raise Defect(EVAL_OVERLAP, "prompt also appears in the eval set")
        key = _record_key(messages)
        if key in seen:
            raise Defect(DUPLICATE, "same conversation as an earlier record")
        seen.add(key)
        ids = raw.get("completion_ids")  # rejection sampling's best-of-K: train on the sampled ids, no re-encode
        if ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) and 0 <= t < len(fmt.tokenizer) for t in ids)):
            raise Defect(BAD_TOKEN_IDS, "completion_ids must be a list of token ids of this tokenizer")
        tools = tool_args(rec)
        enc = fmt.encode_completion(messages[:-1], ids, **tools) if ids else fmt.encode(messages, **tools)
        note = None
        if len(enc) > max_length:
            if overlong == "drop" or not any(enc.assistant_mask[:max_length]):
                why = "" if overlong == "drop" else " (no assistant token fits)"
                raise Defect(OVERLONG, f"{len(enc)} tokens > max_length {max_length}{why}")
            note = (TRUNCATED, f"{len(enc)} tokens cut to {max_length}")
            enc = Encoded(enc.input_ids[:max_length], enc.assistant_mask[:max_length], enc.special_mask[:max_length],
                          min(enc.prompt_len, max_length), enc.meta)
            rec["truncated"] = True
        return {**rec, "encoded": enc}, note

    return _load(path, check)


# -- preferences ------------------------------------------------------------------------------------------
def load_preferences(path, fmt, max_length: int = 2048, overlong: str = "drop",
                     eval_prompts: set[str] | None = None) -> tuple[list[dict], Report]:
    """Preference records: canonical ``{"prompt", "chosen", "rejected", ["edited"]}`` plus ``"_line"``.

    Every response's length is ``len(fmt.encode_preference(prompt, response))`` (or prompt + the record's
    ``<key>_ids`` when it carries ids). With overlong="truncate" an overlong response's last message is cut
    (text decoded from its first ids, and its ``<key>_ids`` cut too) and the record gets
    ``"truncated": [keys]``; responses that become identical are then rejected as chosen_equals_rejected."""
    _check_overlong_arg(overlong)
    seen: set[str] = set()
    evals = _eval_keys(eval_prompts)

    def check(raw: dict, line: int):
        rec = normalize_preference(raw)
        skipped = rec.pop("skipped_completions", None)
        keys = [k for k in RANKING if rec.get(k) is not None]
        prompt = rec["prompt"]
        if not prompt:
            raise Defect(EMPTY_RESPONSE, "prompt is empty")
        _check_messages(prompt, "prompt", fmt.roles)
        for k in keys:
            _check_messages(rec[k], k, fmt.roles)
        _check_order(prompt, "prompt")
        _check_tools(rec, prompt + [m for k in keys for m in rec[k]], fmt)
        for k in keys:
            if not rec[k]:
                raise Defect(EMPTY_RESPONSE, f"{k} has no messages")
            other = next((m["role"] for m in rec[k] if m["role"] != "assistant"), None)
            if other:
                raise Defect(BAD_ROLE_ORDER, f"{k} holds a {other} message; a response holds assistant messages only")
            _check_order(prompt + rec[k], f"prompt + {k}:")
        _check_contents(prompt, "prompt")
        for k in keys:
            _check_contents(rec[k], k)
        _check_distinct(rec, "")
        if evals and prompt_key(prompt) in evals:
            raise Defect(EVAL_OVERLAP, "prompt also appears in the eval set")
        key = _record_key(prompt, *(rec[k] for k in keys))
        if key in seen:
            raise Defect(DUPLICATE, "same prompt and responses as an earlier record")
        seen.add(key)
        rec, note = _fit_preference(rec, keys, fmt, max_length, overlong)
        if skipped:  # counted, so that a file of null scores shows as such, not as fewer completions
            note = [(UNSCORED_COMPLETION, f"completions{skipped} skipped: no numeric 'overall_score' or 'score'")] \
                + ([note] if note else [])
        return rec, note

    return _load(path, check)


def _check_distinct(rec: dict, after: str) -> None:
    """No two ranked responses may render the same (contents are trimmed by the chat format)."""
    for better, worse in ranked_pairs(rec):
        a = [(m["role"], m["content"].strip(), m.get("tool_calls")) for m in rec[better]]
        b = [(m["role"], m["content"].strip(), m.get("tool_calls")) for m in rec[worse]]
        if a == b:
            raise Defect(CHOSEN_EQUALS_REJECTED, f"{better} and {worse} are identical{after}")


def _fit_preference(rec: dict, keys: list[str], fmt, max_length: int, overlong: str):
    """Check every response's tokenized length; cut the overlong ones when truncating."""
    prompt = rec["prompt"]
    tools = tool_args(rec)
    prompt_len = len(rec["prompt_ids"]) if rec.get("prompt_ids") is not None else len(fmt.encode_prompt(prompt, **tools))
    cut = []
    for k in keys:
        ids = rec.get(f"{k}_ids")
        n = prompt_len + len(ids) if ids is not None else len(fmt.encode_preference(prompt, rec[k], **tools))
        if n <= max_length:
            continue
        if overlong == "drop":
            raise Defect(OVERLONG, f"prompt + {k} is {n} tokens > max_length {max_length}")
        shorter = _truncate_response(fmt, prompt, rec[k], max_length, tools)
        if shorter is None or prompt_len >= max_length:
            raise Defect(OVERLONG, f"prompt + {k} is {n} tokens > max_length {max_length}, and the prompt "
                                   f"leaves no room for a response")
        rec[k] = shorter
        if ids is not None:
            rec[f"{k}_ids"] = list(ids)[: max_length - prompt_len]
        cut.append(k)
    if not cut:
        return rec, None
    rec["truncated"] = cut
    _check_distinct(rec, f" after truncation to {max_length} tokens")
    return rec, (TRUNCATED, f"{', '.join(cut)} cut to fit max_length {max_length}")


def _truncate_response(fmt, prompt: list[dict], response: list[dict], max_length: int, tools: dict | None = None) -> list[dict] | None:
    """The response with the end of its last message cut so that prompt + response fits, or None.

    The cut text is decoded from the first content ids; a cut inside a multi-byte character backs off, and
    the result is re-encoded to make sure it fits."""
    head, last = response[:-1], response[-1]
    tools = tools or {}
    if last.get("tool_calls"):  # a tool call cut short is no call: the response cannot be shortened
        return None
    empty = head + [{"role": last["role"], "content": ""}]
    room = max_length - len(fmt.encode_preference(prompt, empty, **tools))
    ids = fmt.text_ids(last["content"].strip())[: max(room, 0)]
    for _ in range(8):  # decode/re-encode drift is at most a token or two
        if not ids:
            return None
        text = fmt.decode(ids)
        shorter = head + [{"role": last["role"], "content": text}]
        if text.strip() and not text.endswith("\ufffd") and len(fmt.encode_preference(prompt, shorter, **tools)) <= max_length:
            return shorter
        ids = ids[:-1]
    return None


# -- prompts ----------------------------------------------------------------------------------------------
def load_prompts(path, fmt=None, max_length: int = 2048,
                 eval_prompts: set[str] | None = None) -> tuple[list[dict], Report]:
    """Prompt records: canonical ``{"id", "prompt"}`` plus ``"_line"``. A record without an id gets
    ``"<file stem>-<line>"``. With `fmt`, a prompt longer than max_length tokens (with its generation
    prompt) is rejected as overlong; prompts are never truncated."""
    seen_prompts: set[str] = set()
    seen_ids: set[str] = set()
    evals = _eval_keys(eval_prompts)
    stem = Path(str(path)).stem

    def check(raw: dict, line: int):
        rec = normalize_prompt(raw, default_id=f"{stem}-{line}")
        prompt = rec["prompt"]
        if not prompt:
            raise Defect(EMPTY_RESPONSE, "prompt is empty")
        _check_messages(prompt, "prompt", fmt.roles if fmt is not None else ROLES)
        _check_order(prompt, "prompt")
        _check_tools(rec, prompt, fmt)
        if prompt[-1]["role"] != "user" and prompt[-1]["role"] not in TOOL_ROLES:
            raise Defect(BAD_ROLE_ORDER, f"prompt ends with {prompt[-1]['role']}; a prompt ends with a user message"
                         + (" (or a tool output)" if fmt is not None and fmt.template == "llama3.1" else ""))
        _check_contents(prompt, "prompt")
        if evals and prompt_key(prompt) in evals:
            raise Defect(EVAL_OVERLAP, "prompt also appears in the eval set")
        key = _record_key(prompt)
        if key in seen_prompts:
            raise Defect(DUPLICATE, "same prompt as an earlier record")
        if rec["id"] in seen_ids:
            raise Defect(DUPLICATE, f"id {rec['id']!r} used by an earlier record")
        seen_prompts.add(key)
        seen_ids.add(rec["id"])
        if fmt is not None:
            n = len(fmt.encode_prompt(prompt, **tool_args(rec)))
            if n > max_length:
                raise Defect(OVERLONG, f"prompt is {n} tokens > max_length {max_length}")
        return rec, None

    return _load(path, check)
