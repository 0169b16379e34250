"""Reading data files and normalising their records to the pipeline's three canonical forms.

Files: local ``.jsonl``, ``.json`` (a list of objects, one object, or one object per line) and ``.parquet``;
anything that is not a local path is taken as a Hugging Face dataset name (``name`` or ``name:split``,
default split ``train``), loaded only when it is read. ``iter_file`` yields ``(line, record)``; a line that is
not valid JSON or not UTF-8 yields ``(line, "<code>: <problem>")`` instead, so that the validator counts it.
A file that cannot be read record by record at all (a ``.parquet`` that is not Parquet, a JSON list broken
beyond the next record) raises DataError: one line naming the file and where, never a silent undercount.

Canonical forms (TRL's column names; every message is ``{"role", "content"}``):

    SFT          {"messages": [system?, user, assistant, ...]}
    preference   {"prompt": [messages], "chosen": [assistant messages], "rejected": [assistant messages],
                  "edited": [assistant messages]  (optional)}          ranking: edited > chosen > rejected
    prompt       {"id": str, "prompt": [messages]}

``id``, ``category`` and ``source`` are kept (a prompt's id is UltraFeedback's ``prompt_id`` when it has one,
as data.hub reads it); so are the token-id fields the sampling stage passes (``prompt_ids``, ``chosen_ids``,
``rejected_ids``, ``edited_ids``) and UltraFeedback's ``score_chosen`` / ``score_rejected``. Accepted input shapes:

    SFT          messages | prompt + completion (strings or message lists) | an HH-RLHF transcript string
                 ("\\n\\nHuman: ...\\n\\nAssistant: ...") in ``text`` or ``messages``
    preference   TRL explicit prompt: prompt (string or messages) + chosen/rejected (strings or messages)
                 TRL implicit prompt: chosen/rejected are whole conversations sharing the prompt
                 HH-RLHF: chosen/rejected are transcripts
                 UltraFeedback: prompt (or instruction) + completions [{"response", "overall_score"|"score"}]
                 (a completion without a numeric score is skipped and counted, not the record)
                 UltraFeedback binarized: prompt + chosen/rejected conversations + score_chosen/score_rejected
    prompt       prompt or instruction (string or messages) | messages (a trailing assistant turn is dropped)

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
               "prompt_ids", "chosen_ids", "rejected_ids", "edited_ids",
               "tools", "builtin_tools")  # llama3.1: the conversation's tool schemas / built-in tools (chat_format)
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
        yield from _iter_json_array(text, p)
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


def _iter_json_array(text: str, path) -> Iterator[tuple[int, dict | str]]:
    """Walk a JSON array element by element so that each record keeps the line where it starts.

    A broken element is reported (``invalid_json: list element N: ...``) and the walk goes on after it, so the
    records behind it are still read and counted. Where its end cannot be found (brackets that never balance,
    a string that never closes, the file cut short) the records after it cannot be counted either: DataError."""
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
    index, no_comma = 0, False
    while True:
        index += 1
        line = line_at(pos)
        try:
            obj, end = decoder.raw_decode(text, pos)
            problem = None
        except json.JSONDecodeError as e:
            obj, end, problem = None, pos, f"{e.msg} (line {e.lineno} column {e.colno})"
        after = ws.match(text, end).end()
        sep = text[after : after + 1]
        if problem is not None or sep not in (",", "]"):  # the slow path: find where this element ends
            found = _element_end(text, pos)
            if found is None:
                where = problem or f"expected ',' or ']' at line {line_at(after)}"
                raise DataError(f"{path}: invalid JSON in list element {index} (line {line}): {where}; the list "
                                "cannot be read past it, so its later records cannot be counted: fix the file "
                                "(or write it as .jsonl, where a bad line costs only itself)")
            after, sep = found
            if problem is None and sep != "missing":
                problem = f"unexpected text after it at line {line_at(end)}"
        if no_comma:
            yield line, f"invalid_json: list element {index}: no ',' between it and the element before"
        elif problem is not None:
            yield line, f"invalid_json: list element {index}: {problem}"
        elif isinstance(obj, dict):
            yield line, obj
        else:
            yield line, f"invalid_json: list element {index}: expected a JSON object, got {type(obj).__name__}"
        no_comma = sep == "missing"  # two elements with no comma between: the second is counted as broken
        if sep == "]":
            if text[after + 1 :].strip():
                yield line_at(after), "invalid_json: extra data after the list"
            return
        pos = ws.match(text, after + 1).end() if sep == "," else after
        if sep == "," and text.startswith("]", pos):  # a trailing comma: no record behind it
            return


def _element_end(text: str, pos: int) -> tuple[int, str] | None:
    """Where the list element starting at `pos` ends, read as brackets and strings only (so a syntax error
    inside it does not matter): (index of the ',' or ']' after it, that character), or (index, "missing")
    when a new object or list starts right after it without a comma. None when its brackets do not balance,
    a string runs past the end of its line (JSON strings hold no raw newline: a quote is missing or extra, and
    the quotes after it pair up wrongly) or the text ends first: nothing after it can be trusted."""
    stack: list[str] = []
    closed = False  # a bracketed value at the list's level has been closed
    i, n = pos, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i += 1
            while i < n and text[i] != '"' and text[i] != "\n":
                i += 2 if text[i] == "\\" else 1
            if i >= n or text[i] == "\n":
                return None
        elif c in "{[":
            if not stack and closed:
                return i, "missing"
            stack.append("}" if c == "{" else "]")
        elif c in "}]":
            if not stack:
                return (i, "]") if c == "]" else None
            if stack.pop() != c:
                return None
            closed = not stack
        elif c == "," and not stack:
            return i, ","
        i += 1
    return None


PARQUET_MAGIC = b"PAR1"  # a Parquet file starts and ends with these 4 bytes


def _iter_parquet(p: Path) -> Iterator[tuple[int, dict | str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(p, "rb") as f:  # checked first: pyarrow's own error is a traceback about footers and magic bytes
        head = f.read(64)
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 4))
        tail = f.read(4)
    if head[:4] != PARQUET_MAGIC:
        raise DataError(f"{p}: not a Parquet file (no PAR1 magic bytes): {_looks_like(head, size)}; write it with "
                        "a Parquet writer, or give it the suffix of what it is (.jsonl, .json)")
    if size < 12 or tail != PARQUET_MAGIC:
        raise DataError(f"{p}: not a whole Parquet file: it starts with PAR1 but does not end with it (cut short?)")
    row = 0
    try:
        for batch in pq.ParquetFile(p).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                yield row, rec
    except (pa.ArrowException, OSError) as e:  # a damaged file: one line, and how far it was read
        raise DataError(f"{p}: cannot read it as Parquet after {row} rows: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _looks_like(head: bytes, size: int) -> str:
    """What a file that is not what its suffix says seems to be, from its first bytes."""
    if size == 0:
        return "it is empty"
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    if len(head) == 64:  # a character cut at the 64th byte is not a sign of binary
        text = text[: len(text) - 3] + text[-3:].rstrip("\ufffd")
    first = next((line for line in text.splitlines() if line.strip()), "")
    shown = repr(first[:40] + ("..." if len(first) > 40 else ""))
    if first.lstrip().startswith(("{", "[")):
        return f"it looks like JSON text, starting {shown}"
    binary = any(c == "\ufffd" or (ord(c) < 32 and c not in "\t\r\n") for c in text)
    if not binary and ("," in first or "\t" in first):
        return f"it looks like CSV/TSV text, starting {shown}"
    if not binary:
        return f"it looks like text, starting {shown}"
    return f"it starts with bytes {head[:8].hex(' ')}"


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

    Message dicts are copied with their ``role`` and ``content`` only (and an assistant's ``tool_calls``,
    llama3.1, whose content may then be absent: ""); a missing key stays missing so that the validator can
    report it. OpenAI-style content parts ``[{"type": "text", "text": ...}]`` are joined."""
    if isinstance(x, str):
        return parse_transcript(x) if is_transcript(x) else [{"role": role, "content": x}]
    if isinstance(x, dict) and ("role" in x or "content" in x):
        x = [x]
    if not isinstance(x, (list, tuple)) or not all(isinstance(m, dict) for m in x):
        raise DataError(f"{what}: expected a string or a list of messages, got {type(x).__name__}")
    out = []
    for m in x:
        msg = {k: m[k] for k in ("role", "content") if k in m}
        if m.get("tool_calls"):  # null or [] (a datasets column for every message) is no tool call
            msg["tool_calls"] = m["tool_calls"]
            if msg.get("content") is None:
                msg["content"] = ""
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
    """Best-scored completion is chosen, worst is rejected; their scores are kept. A completion without a
    numeric score (UltraFeedback has nulls) is skipped, not the record: its index goes under
    ``"skipped_completions"``, which the validator counts and drops."""
    prompt = rec.get("prompt") if rec.get("prompt") is not None else rec.get("instruction")
    if prompt is None:
        raise DataError("UltraFeedback record without 'prompt' (or 'instruction')")
    scored, skipped = [], []
    for i, c in enumerate(rec["completions"] or []):
        if not isinstance(c, dict):
            raise DataError(f"completions[{i}]: expected an object, got {type(c).__name__}")
        score = c.get("overall_score") if c.get("overall_score") is not None else c.get("score")
        text = c.get("response", c.get("text"))
        if text is None:
            raise DataError(f"completions[{i}]: needs 'response' (or 'text')")
        if not isinstance(score, (int, float)) or isinstance(score, bool) or score != score:  # None, text, NaN
            skipped.append(i)
            continue
        scored.append((float(score), i, text))
    if len(scored) < 2:
        why = f" ({len(skipped)} without a numeric 'overall_score' or 'score')" if skipped else ""
        raise DataError(f"UltraFeedback record with {len(scored)} scored completion(s){why}; a preference needs two")
    best = max(scored, key=lambda s: (s[0], -s[1]))
    worst = min(scored, key=lambda s: (s[0], s[1]))
    if best[0] == worst[0]:
        raise DataError(f"all completions have the same score {best[0]:g}: no preference", code="tied_scores")
    return {**_kept(rec), "prompt": to_messages(prompt, "user", "prompt"),
            "chosen": to_messages(best[2], "assistant", "chosen"),
            "rejected": to_messages(worst[2], "assistant", "rejected"),
            "score_chosen": best[0], "score_rejected": worst[0],
            **({"skipped_completions": skipped} if skipped else {})}


def ranked_pairs(record: dict) -> list[tuple[str, str]]:
    """Every ordered (better, worse) pair among the responses present, best first:
    edited/chosen/rejected gives 3 pairs, chosen/rejected gives 1."""
    present = [k for k in RANKING if record.get(k) is not None]
    return [(a, b) for i, a in enumerate(present) for b in present[i + 1 :]]


# -- prompts ----------------------------------------------------------------------------------------------
def normalize_prompt(rec: dict, default_id: str | None = None) -> dict:
    """``{"id", "prompt": [...]}`` (plus kept fields) from ``prompt``, ``instruction`` (UltraFeedback, as for
    preferences) or ``messages``. The id is ``id``, else UltraFeedback's ``prompt_id``, else `default_id`."""
    if not isinstance(rec, dict):
        raise DataError(f"expected a JSON object, got {type(rec).__name__}")
    if rec.get("prompt") is not None:
        prompt = to_messages(rec["prompt"], "user", "prompt")
    elif rec.get("instruction") is not None:
        prompt = to_messages(rec["instruction"], "user", "instruction")
    elif rec.get("messages") is not None:
        prompt = to_messages(rec["messages"], "user", "messages")
        if prompt and prompt[-1].get("role") == "assistant":
            prompt = prompt[:-1]
    else:
        raise DataError(f"not a prompt record: expected 'prompt', 'instruction' or 'messages' "
                        f"(keys: {', '.join(sorted(rec)) or 'none'})")
    # UltraFeedback names a prompt's id prompt_id: the hub download (data.hub) keeps it too, so a local file
    # and the same set fetched from the Hub give the same ids, hence the same sampling seeds
    rid = next((rec[k] for k in ("prompt_id", "id") if rec.get(k) not in (None, "")), default_id)
    return {**_kept(rec), "id": None if rid is None else str(rid), "prompt": prompt}
