"""Reading data files and normalising their records to the pipeline's three canonical forms.

Files: local ``.jsonl``, ``.json`` (a list of objects, one object, or one object per line) and ``.parquet``;
anything that is not a local path is taken as a Hugging Face dataset name (``name`` or ``name:split``,
default split ``train``), loaded only when it is read. ``iter_file`` yields ``(line, record)``; a line that is
not valid JSON or not UTF-8 yields ``(line, "<code>: <problem>")`` instead, so that the validator counts it.

Canonical forms (TRL's column names; every message is ``{"role", "content"}``):

    SFT          {"messages": [system?, user, assistant, ...]}
    preference   {"prompt": [messages], "chosen": [assistant messages], "rejected": [assistant messages],
                  "edited": [assistant messages]  (optional)}          ranking: edited > chosen > rejected
    prompt       {"id": str, "prompt": [messages]}

``id``, ``category`` and ``source`` are kept; so are the token-id fields the sampling stage passes
(``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``edited_ids``) and UltraFeedback's ``score_chosen`` /
``score_rejected``. Accepted input shapes:

    SFT          messages | prompt + completion (strings or message lists) | an HH-RLHF transcript string
                 ("\\n\\nHuman: ...\\n\\nAssistant: ...") in ``text`` or ``messages``
    preference   TRL explicit prompt: prompt (string or messages) + chosen/rejected (strings or messages)
                 TRL implicit prompt: chosen/rejected are whole conversations sharing the prompt
                 HH-RLHF: chosen/rejected are transcripts
                 UltraFeedback: prompt (or instruction) + completions [{"response", "overall_score"|"score"}]
                 UltraFeedback binarized: prompt + chosen/rejected conversations + score_chosen/score_rejected
    prompt       prompt (string or messages) | messages (a trailing assistant turn is dropped)

Normalisers only reshape; they do not judge roles, emptiness or lengths (``data.validate`` does). A record
whose shape they cannot read raises ``DataError`` whose ``code`` says why.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

RANKING = ("edited", "chosen", "rejected")  # best first
KEEP_FIELDS = ("id", "category", "source", "score_chosen", "score_rejected", "margin",
               "prompt_ids", "chosen_ids", "rejected_ids", "edited_ids")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_HH_SPLIT = re.compile(r"\n\n(Human|Assistant):[ \t]?")


class DataError(ValueError):
    """A data file or record that cannot be read. ``code`` is the validator's defect code for it."""

    def __init__(self, message: str, code: str = "unknown_format"):
        super().__init__(message)
        self.code = code


# -- files ------------------------------------------------------------------------------------------------
def iter_file(path: str | os.PathLike) -> Iterator[tuple[int, dict | str]]:
    """Yield ``(line, record)`` for every record of `path`; ``(line, "invalid_json: ...")`` or
    ``(line, "not_utf8: ...")`` for a line that cannot be read. For ``.parquet`` files and datasets the
    "line" is the 1-based row number.

    Raises DataError for a missing local file, a folder or an unsupported file type."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{path}: is a folder; expected a .jsonl, .json or .parquet file")
    if not p.is_file():
        if _looks_local(str(path)):
            raise DataError(f"{path}: file not found")
        yield from _iter_hf_dataset(str(path))
        return
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(p)
    elif suffix == ".json":
        yield from _iter_json(p)
    elif suffix == ".parquet":
        yield from _iter_parquet(p)
    else:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; expected .jsonl, .json or .parquet")


def _looks_local(path: str) -> bool:
    """A path meant as a local file (rather than a Hugging Face dataset name such as ``Anthropic/hh-rlhf``)."""
    return (path.lower().endswith(LOCAL_SUFFIXES) or path.startswith(("/", "./", "../", "~", "\\"))
            or os.path.splitdrive(path)[0] != "")


def _parse_line(lineno: int, raw: bytes) -> tuple[int, dict | str] | None:
    """One JSONL line: a record, an error string, or None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return lineno, f"not_utf8: byte 0x{raw[e.start]:02x} at column {e.start + 1} is not valid UTF-8"
    if lineno == 1:
        text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return lineno, f"invalid_json: {e.msg} at column {e.colno}"
    if not isinstance(obj, dict):
        return lineno, f"invalid_json: expected a JSON object, got {type(obj).__name__}"
    return lineno, obj


def _iter_jsonl(p: Path) -> Iterator[tuple[int, dict | str]]:
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            item = _parse_line(lineno, raw)
            if item is not None:
                yield item


def _iter_json(p: Path) -> Iterator[tuple[int, dict | str]]:
    """A JSON list (each element reported at the line where it starts), one object, or JSON Lines."""
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield data.count(b"\n", 0, e.start) + 1, f"not_utf8: byte 0x{data[e.start]:02x} is not valid UTF-8"
        return
    text = text.removeprefix("\ufeff")
    body = text.lstrip()
    if body.startswith("["):
        yield from _iter_json_array(text)
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        first = next((line for line in text.splitlines() if line.strip()), "")
        item = _parse_line(1, first.encode()) if first else None
        if item is not None and isinstance(item[1], dict):
            yield from _iter_jsonl(p)  # one object per line in a .json file
        else:
            yield e.lineno, f"invalid_json: {e.msg} at column {e.colno}"
        return
    if isinstance(obj, dict):
        yield text[: len(text) - len(body)].count("\n") + 1, obj
    else:
        yield 1, f"invalid_json: expected a JSON object or a list of objects, got {type(obj).__name__}"


def _iter_json_array(text: str) -> Iterator[tuple[int, dict | str]]:
    """Walk a JSON array element by element so that each record keeps the line where it starts."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    counted = [0, 1]  # position up to which newlines are counted, and the line number there

    def line_at(i: int) -> int:
        counted[1] += text.count("\n", counted[0], i)
        counted[0] = i
        return counted[1]

    pos = ws.match(text, ws.match(text, 0).end() + 1).end()  # past "[" and whitespace
    if text.startswith("]", pos):
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield e.lineno, f"invalid_json: {e.msg} at column {e.colno}"
            return
        if isinstance(obj, dict):
            yield line_at(pos), obj
        else:
            yield line_at(pos), f"invalid_json: expected a JSON object, got {type(obj).__name__}"
        pos = ws.match(text, end).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            if text[pos + 1 :].strip():
                yield line_at(pos), "invalid_json: extra data after the list"
            return
        else:
            yield line_at(pos), "invalid_json: expected ',' or ']' after a list element"
            return


def _iter_parquet(p: Path) -> Iterator[tuple[int, dict | str]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(p).iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            yield row, rec


def _iter_hf_dataset(spec: str) -> Iterator[tuple[int, dict | str]]:
    """``name`` or ``name:split`` from the Hugging Face Hub (or its cache)."""
    name, _, split = spec.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # one line, not the loader's traceback
        raise DataError(f"{spec}: not a local file, and cannot load it as a Hugging Face dataset: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    for i, rec in enumerate(ds, 1):
        yield i, dict(rec)


# -- messages ---------------------------------------------------------------------------------------------
def parse_transcript(text: str) -> list[dict]:
    """HH-RLHF's ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` as messages. A final empty ``Assistant:`` (a prompt
    that waits for its answer) is dropped."""
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _HH_SPLIT.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError("not an HH-RLHF transcript (expected '\\n\\nHuman: ...\\n\\nAssistant: ...')")
    messages = [{"role": HH_ROLES[who], "content": said} for who, said in zip(parts[1::2], parts[2::2])]
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip():
        messages.pop()
    return messages


def is_transcript(x) -> bool:
    return isinstance(x, str) and ("\n\nHuman:" in x or x.startswith("Human:"))


def to_messages(x, role: str, what: str) -> list[dict]:
    """A string (one message of `role`), an HH transcript, or a message list, as a list of message dicts.

    Message dicts are copied with their ``role`` and ``content`` only; a missing key stays missing so that
    the validator can report it. OpenAI-style content parts ``[{"type": "text", "text": ...}]`` are joined."""
    if isinstance(x, str):
        return parse_transcript(x) if is_transcript(x) else [{"role": role, "content": x}]
    if isinstance(x, dict) and ("role" in x or "content" in x):
        x = [x]
    if not isinstance(x, (list, tuple)) or not all(isinstance(m, dict) for m in x):
        raise DataError(f"{what}: expected a string or a list of messages, got {type(x).__name__}")
    out = []
    for m in x:
        msg = {k: m[k] for k in ("role", "content") if k in m}
        if isinstance(msg.get("content"), list) and all(isinstance(c, dict) and "text" in c for c in msg["content"]):
            msg["content"] = "".join(str(c["text"]) for c in msg["content"])
        out.append(msg)
    return out


def _kept(rec: dict) -> dict:
    return {k: rec[k] for k in KEEP_FIELDS if k in rec}


def _same(a: dict, b: dict) -> bool:
    return a.get("role") == b.get("role") and a.get("content") == b.get("content")


# -- SFT --------------------------------------------------------------------------------------------------
def normalize_sft(rec: dict) -> dict:
    """``{"messages": [...]}`` (plus kept fields) from any accepted SFT shape."""
    if not isinstance(rec, dict):
        raise DataError(f"expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        messages = to_messages(rec["messages"], "user", "messages")
    elif "prompt" in rec and "completion" in rec:
        messages = to_messages(rec["prompt"], "user", "prompt") + to_messages(rec["completion"], "assistant", "completion")
    elif is_transcript(rec.get("text")):
        messages = parse_transcript(rec["text"])
    else:
        raise DataError(f"not an SFT record: expected 'messages', 'prompt'+'completion' or an HH-RLHF 'text' "
                        f"(keys: {', '.join(sorted(rec)) or 'none'})")
    return {**_kept(rec), "messages": messages}


# -- preferences ------------------------------------------------------------------------------------------
def normalize_preference(rec: dict) -> dict:
    """``{"prompt", "chosen", "rejected", ["edited"]}`` (plus kept fields) from any accepted preference shape."""
    if not isinstance(rec, dict):
        raise DataError(f"expected a JSON object, got {type(rec).__name__}")
    if "completions" in rec:
        return _from_ultrafeedback(rec)
    missing = [k for k in ("chosen", "rejected") if rec.get(k) is None]
    if missing:
        raise DataError(f"not a preference record: missing {' and '.join(repr(k) for k in missing)} "
                        f"(keys: {', '.join(sorted(rec)) or 'none'})")
    keys = [k for k in RANKING if rec.get(k) is not None]
    prompt = rec.get("prompt")
    if prompt is None:  # implicit prompt: whole conversations that share it (TRL implicit, HH-RLHF)
        if any(isinstance(rec[k], str) and not is_transcript(rec[k]) for k in keys):
            raise DataError("chosen/rejected are plain strings and there is no 'prompt'")
        convs = {k: to_messages(rec[k], "assistant", k) for k in keys}
        prompt, responses = split_shared_prompt(convs)
        if not prompt:
            raise DataError(f"{' and '.join(keys)} share no prompt (their first messages differ)", code="empty_response")
    else:
        prompt = to_messages(prompt, "user", "prompt")
        responses = {k: _strip_prefix(to_messages(rec[k], "assistant", k), prompt) for k in keys}
    return {**_kept(rec), "prompt": prompt, **responses}


def split_shared_prompt(convs: dict[str, list[dict]]) -> tuple[list[dict], dict[str, list[dict]]]:
    """Split conversations into their common prompt and each one's response (what follows it).

    The prompt is the longest common prefix of messages, cut back so that it does not end with an
    assistant message: two identical conversations give identical responses, not empty ones."""
    lists = list(convs.values())
    n = 0
    while all(len(c) > n for c in lists) and all(_same(c[n], lists[0][n]) for c in lists):
        n += 1
    while n > 0 and lists[0][n - 1].get("role") == "assistant":
        n -= 1
    return lists[0][:n], {k: c[n:] for k, c in convs.items()}


def _strip_prefix(conv: list[dict], prompt: list[dict]) -> list[dict]:
    """A response given as the whole conversation (UltraFeedback binarized) loses its copy of the prompt."""
    if len(conv) > len(prompt) and all(_same(a, b) for a, b in zip(conv, prompt)):
        return conv[len(prompt) :]
    return conv


def _from_ultrafeedback(rec: dict) -> dict:
    """Best-scored completion is chosen, worst is rejected; their scores are kept."""
    prompt = rec.get("prompt", rec.get("instruction"))
    if prompt is None:
        raise DataError("UltraFeedback record without 'prompt' (or 'instruction')")
    scored = []
    for i, c in enumerate(rec["completions"] or []):
        if not isinstance(c, dict):
            raise DataError(f"completions[{i}]: expected an object, got {type(c).__name__}")
        score = c.get("overall_score", c.get("score"))
        text = c.get("response", c.get("text"))
        if not isinstance(score, (int, float)) or isinstance(score, bool) or text is None:
            raise DataError(f"completions[{i}]: needs 'response' and a numeric 'overall_score' or 'score'")
        scored.append((float(score), i, text))
    if len(scored) < 2:
        raise DataError(f"UltraFeedback record with {len(scored)} completion(s); a preference needs two")
    best = max(scored, key=lambda s: (s[0], -s[1]))
    worst = min(scored, key=lambda s: (s[0], s[1]))
    if best[0] == worst[0]:
        raise DataError(f"all completions have the same score {best[0]:g}: no preference", code="tied_scores")
    return {**_kept(rec), "prompt": to_messages(prompt, "user", "prompt"),
            "chosen": to_messages(best[2], "assistant", "chosen"),
            "rejected": to_messages(worst[2], "assistant", "rejected"),
            "score_chosen": best[0], "score_rejected": worst[0]}


def ranked_pairs(record: dict) -> list[tuple[str, str]]:
    """Every ordered (better, worse) pair among the responses present, best first:
    edited/chosen/rejected gives 3 pairs, chosen/rejected gives 1."""
    present = [k for k in RANKING if record.get(k) is not None]
    return [(a, b) for i, a in enumerate(present) for b in present[i + 1 :]]


# -- prompts ----------------------------------------------------------------------------------------------
def normalize_prompt(rec: dict, default_id: str | None = None) -> dict:
    """``{"id", "prompt": [...]}`` (plus kept fields) from ``prompt`` or ``messages``."""
    if not isinstance(rec, dict):
        raise DataError(f"expected a JSON object, got {type(rec).__name__}")
    if rec.get("prompt") is not None:
        prompt = to_messages(rec["prompt"], "user", "prompt")
    elif rec.get("messages") is not None:
        prompt = to_messages(rec["messages"], "user", "messages")
        if prompt and prompt[-1].get("role") == "assistant":
            prompt = prompt[:-1]
    else:
        raise DataError(f"not a prompt record: expected 'prompt' or 'messages' (keys: {', '.join(sorted(rec)) or 'none'})")
    rid = rec.get("id", default_id)
    return {**_kept(rec), "id": None if rid is None else str(rid), "prompt": prompt}
