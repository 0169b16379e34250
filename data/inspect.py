"""Show exactly what the model sees for a data file: every token, and which ones are trained.

    python -m data.inspect FILE --tokenizer DIR|llama3|llama3.1 [--template llama3|llama3.1] [--date D]
                           [-n 3] [--json OUT] [--color auto|always|never]

--tokenizer takes what a recipe's model.tokenizer takes: a folder (or tokenizer.json), or a name (`llama3`,
`llama3.1`: Meta's 128k vocabulary); --template/--date what model.chat_template/template_date take (default:
the tokenizer's own template family).

FILE is a .jsonl, or a .json holding one conversation or a list of them. Records may be SFT-shaped
(``messages``, ``prompt`` + ``completion``, an HH-RLHF transcript) or preference records (shown as prompt +
chosen). For each of the first N conversations every token is printed, token boundaries marked with a dim
``|``; trained tokens (assistant_mask = 1) are green, masked ones grey, formatting (special) tokens bold;
newlines show as ``\\n``. Then the counts. With ``--json OUT`` the first conversation's ``text`` (the rendered
template), ``input_ids``, ``assistant_mask`` and ``special_mask`` are written to OUT.

Any error prints one line, ``error: <file>:<line>: <problem>`` (or ``error: <file>: <problem>``), and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from data.io import write_json
from data.chat_format import TEMPLATES, TOKENIZER_NAMES, ChatFormatError, load_tokenizer, tool_args
from data.formats import DataError, iter_file, normalize_preference, normalize_sft

RESET = "\x1b[0m"
STYLES = {  # (trained, special) -> ANSI style
    (1, 0): "\x1b[32m",    # trained text: green
    (1, 1): "\x1b[1;32m",  # trained special token (the assistant's eot): bold green
    (0, 0): "\x1b[90m",    # masked text: grey
    (0, 1): "\x1b[1;36m",  # masked special token: bold cyan
}
SEPARATOR = "\x1b[2m|\x1b[0m"


class InspectError(Exception):
    """One line for the user: '<file>:<line>: <problem>'."""


def _byte_decoder() -> dict[str, int]:
    """The inverse of the byte-level BPE alphabet (GPT-2's bytes_to_unicode), shared by Llama 3."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


BYTE_DECODER = _byte_decoder()


def token_text(fmt, token_id: int) -> str:
    """A token as a person should read it: special tokens by name, text as text, a piece of a multi-byte
    character as ``\\xNN`` escapes, newlines and tabs escaped."""
    piece = fmt.tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        return f"<id {token_id}>"
    if token_id in fmt.formatting_ids or (piece.startswith("<|") and piece.endswith("|>")):
        return piece
    if all(c in BYTE_DECODER for c in piece):
        raw = bytes(BYTE_DECODER[c] for c in piece)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"\\x{b:02x}" for b in raw)
    else:
        text = fmt.decode([token_id])
    return text.replace("\t", "\\t").replace("\r", "\\r").replace("\n", "\\n")


def conversation(raw: dict) -> list[dict]:
    """The messages to show: an SFT record's conversation, or a preference record's prompt + chosen."""
    try:
        messages = normalize_sft(raw)["messages"]
    except DataError:
        try:
            rec = normalize_preference(raw)
        except DataError as e:
            raise DataError(f"neither an SFT nor a preference record: {e}") from None
        messages = rec["prompt"] + rec["chosen"]
    if not messages:
        raise DataError("no messages")
    for i, m in enumerate(messages, 1):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"message {i} needs a string 'role' and 'content'")
    return messages


def _record_tools(path: str, lines: list[int]) -> dict[int, dict]:
    """line -> the record's tool_args (llama3.1 tools / builtin_tools), for the lines shown."""
    out, last = {}, max(lines, default=0)
    for line, item in iter_file(path):
        if line > last:
            break
        if line in lines and isinstance(item, dict) and tool_args(item):
            out[line] = tool_args(item)
    return out


def read_conversations(path: str, n: int) -> list[tuple[int, list[dict]]]:
    """The first `n` conversations of `path` as (line, messages)."""
    out = []
    for line, item in iter_file(path):
        if isinstance(item, str):
            code, _, problem = item.partition(": ")
            raise InspectError(f"{path}:{line}: {code.replace('_', ' ')}: {problem}")
        try:
            out.append((line, conversation(item)))
        except DataError as e:
            raise InspectError(f"{path}:{line}: {e}") from None
        if len(out) >= n:
            break
    if not out:
        raise InspectError(f"{path}: no conversations")
    return out


def show(fmt, line: int, messages: list[dict], color: bool, tools: dict | None = None) -> list[str]:
    """The coloured token stream of one conversation (with its record's tools, llama3.1) and its counts."""
    enc = fmt.encode(messages, **(tools or {}))
    sep = SEPARATOR if color else "|"
    stream = ""
    for tid, trained, special in zip(enc.input_ids, enc.assistant_mask, enc.special_mask):
        text = token_text(fmt, tid)
        if stream and not stream.endswith("\n"):
            stream += sep
        stream += f"{STYLES[trained, special]}{text}{RESET}" if color else text
        if "\\n" in text:  # a token holding a newline also breaks the line, for the layout
            stream += "\n"
    n, trained, special = len(enc), sum(enc.assistant_mask), sum(enc.special_mask)
    return [
        f"== line {line}: {len(messages)} messages, {n} tokens: {trained} trained, {n - trained} masked, "
        f"{special} special ==",
        stream.rstrip("\n"),
        "",
    ]


def legend(color: bool) -> str:
    names = {(1, 0): "trained", (1, 1): "trained special", (0, 0): "masked", (0, 1): "masked special"}
    if not color:
        return "legend: tokens separated by |; trained = assistant_mask 1; special = formatting tokens (use --color always to see them)"
    return "legend: " + "  ".join(f"{STYLES[k]}{v}{RESET}" for k, v in names.items()) + f"  token boundary {SEPARATOR}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.inspect", description=__doc__.splitlines()[0])
    ap.add_argument("file", help="conversation .json (one object or a list) or .jsonl")
    ap.add_argument("--tokenizer", required=True, help="tokenizer folder (or tokenizer.json) with Llama 3's special "
                    f"tokens, or a name: {', '.join(TOKENIZER_NAMES)}")
    ap.add_argument("--template", choices=TEMPLATES, help="chat template family (default: the tokenizer's own)")
    ap.add_argument("--date", help="llama3.1's Today Date (model.template_date)")
    ap.add_argument("-n", "--num", type=int, default=3, help="how many conversations to show (default 3)")
    ap.add_argument("--json", metavar="OUT", help="write the first conversation's text, ids and masks here")
    ap.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    args = ap.parse_args(argv)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    try:
        if not os.path.isfile(args.file):
            raise InspectError(f"{args.file}: file not found")
        fmt = load_tokenizer(args.tokenizer, args.template, args.date)
        convs = read_conversations(args.file, max(args.num, 1))
        tools = _record_tools(args.file, [line for line, _ in convs])
        out = [legend(color), f"template: {fmt.template}" + (f" (Today Date: {fmt.date})" if fmt.template == "llama3.1" else ""), ""]
        for line, messages in convs:
            out += show(fmt, line, messages, color, tools.get(line))
        total = [fmt.encode(m, **tools.get(line, {})) for line, m in convs]
        out.append(f"{len(convs)} conversation{'s' if len(convs) != 1 else ''} shown: {sum(map(len, total))} tokens, "
                   f"{sum(sum(e.assistant_mask) for e in total)} trained, {sum(sum(e.special_mask) for e in total)} special")
        if args.json:
            line, messages = convs[0]
            enc = total[0]
            write_json(args.json, {"text": fmt.render(messages, **tools.get(line, {})), "input_ids": enc.input_ids,
                                   "assistant_mask": enc.assistant_mask, "special_mask": enc.special_mask})
            out.append(f"wrote {args.json} (line {line})")
        print("\n".join(out))
    except (InspectError, DataError, ChatFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `| head`
        return 0
    except Exception as e:  # never a traceback
        print(f"error: {args.file}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
