"""The Llama 3 chat format: the one place where text becomes token ids and masks.

Every stage (SFT, reward, sampling, DPO, evals) goes through this module, so that all of them see the
same bytes, the same ids and the same masks.

Format (Meta's Llama 3 Instruct template, without the 3.1 "Cutting Knowledge Date" system header):

    <|begin_of_text|>                                        once, at the very start
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>     per message
    <|start_header_id|>assistant<|end_header_id|>\\n\\n       the generation prompt

Ids are built segment by segment (special tokens by id, text pieces by the tokenizer with no special
tokens added), which is what tokenizing the rendered string gives for Llama 3's pre-tokenizer (the tests
check this on the real 128k vocabulary) and which makes three things true by construction:

- exactly one BOS: the tokenizer never adds a second one;
- the prompt's ids (with the generation prompt) are a prefix of prompt + answer;
- masks are exact at token level, with no offset arithmetic.

Masks, 1 = yes, same length as input_ids:
- ``assistant_mask``: assistant content tokens and the ``<|eot_id|>`` that ends the assistant turn. SFT trains
  on these; so the model learns to stop.
- ``special_mask``: formatting tokens: BOS, ``<|start_header_id|>``, the role name, ``<|end_header_id|>``, the
  ``\\n\\n`` after it, ``<|eot_id|>`` and pad. DPO masks these out (Llama 3) of both chosen and rejected.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
# Llama 3.1+ calls id 128004 <|finetune_right_pad_id|>; Llama 3.0 ships the same id as a reserved token.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_2|>")
SPECIAL_TOKENS = (BOS, EOS, START_HEADER, END_HEADER, EOT)
ROLES = ("system", "user", "assistant")

TEMPLATE_NAME = "llama3"
# Meta's chat_template for Meta-Llama-3-8B-Instruct, verbatim. `render` below must agree with it byte for byte.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


class ChatFormatError(ValueError):
    """A tokenizer or conversation that the Llama 3 format cannot take; the message says why."""


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The exact text Meta's template produces for `messages`."""
    parts = [BOS]
    for m in messages:
        parts.append(f"{START_HEADER}{m['role']}{END_HEADER}\n\n{m['content'].strip()}{EOT}")
    if add_generation_prompt:
        parts.append(f"{START_HEADER}assistant{END_HEADER}\n\n")
    return "".join(parts)


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
    """Wraps a Hugging Face tokenizer that has the Llama 3 special tokens."""

    def __init__(self, tokenizer, name: str = "tokenizer"):
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ChatFormatError(f"{name}: not a Llama 3 tokenizer: missing special tokens {', '.join(missing)}")
        self.bos_id = vocab[BOS]
        self.eos_id = vocab[EOS]
        self.start_header_id = vocab[START_HEADER]
        self.end_header_id = vocab[END_HEADER]
        self.eot_id = vocab[EOT]
        pad = next((p for p in PAD_CANDIDATES if p in vocab), None)
        if pad is None:
            raise ChatFormatError(f"{name}: no dedicated pad token ({' or '.join(PAD_CANDIDATES)})")
        self.pad_token = pad
        self.pad_id = vocab[pad]
        if self.pad_id in (self.eos_id, self.eot_id):
            raise ChatFormatError(f"{name}: pad token id {self.pad_id} equals eos/eot; the end of turn would be masked")
        # Make the HF tokenizer agree, so that anything else that pads (generate, vLLM, TRL) uses the same pad.
        tokenizer.pad_token = pad
        tokenizer.bos_token = BOS
        tokenizer.eos_token = EOT
        tokenizer.chat_template = CHAT_TEMPLATE
        self.stop_ids = [self.eot_id, self.eos_id]
        self.formatting_ids = {self.bos_id, self.start_header_id, self.end_header_id, self.eot_id, self.pad_id, self.eos_id}
        self._newlines = self.text_ids("\n\n")
        self._role_ids = {r: self.text_ids(r) for r in ROLES}

    # -- text pieces ------------------------------------------------------------------------------------
    def text_ids(self, text: str) -> list[int]:
        """Ids of plain text: no BOS added, special-token strings inside it never parsed as special tokens."""
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _header(self, role: str) -> list[int]:
        role_ids = self._role_ids.get(role) or self.text_ids(role)
        return [self.start_header_id, *role_ids, self.end_header_id, *self._newlines]

    # -- conversations ----------------------------------------------------------------------------------
    def encode(self, messages: list[dict], add_generation_prompt: bool = False) -> Encoded:
        """Tokenize a conversation. `prompt_len` marks where the final assistant message's content starts."""
        ids, amask, smask = [self.bos_id], [0], [1]
        prompt_len = 0
        for i, m in enumerate(messages):
            header = self._header(m["role"])
            ids += header
            amask += [0] * len(header)
            smask += [1] * len(header)
            body = self.text_ids(m["content"].strip()) + [self.eot_id]
            is_assistant = int(m["role"] == "assistant")
            if is_assistant and i == len(messages) - 1:
                prompt_len = len(ids)
            ids += body
            amask += [is_assistant] * len(body)
            smask += [0] * (len(body) - 1) + [1]
        if add_generation_prompt:
            header = self._header("assistant")
            ids += header
            amask += [0] * len(header)
            smask += [1] * len(header)
            prompt_len = len(ids)
        return Encoded(ids, amask, smask, prompt_len or len(ids))

    def encode_prompt(self, prompt: list[dict]) -> list[int]:
        """Prompt ids ending in the generation prompt, ready for generation (one BOS)."""
        return self.encode(prompt, add_generation_prompt=True).input_ids

    def encode_completion(self, prompt: list[dict], completion_ids: list[int]) -> Encoded:
        """Prompt messages + generated ids, kept as ids: no decode/re-encode drift.

        A completion that stopped on eot keeps it; one cut off by the length limit has none."""
        enc = self.encode(prompt, add_generation_prompt=True)
        completion_ids = list(completion_ids)
        return Encoded(
            enc.input_ids + completion_ids,
            enc.assistant_mask + [1] * len(completion_ids),
            enc.special_mask + [int(t in self.formatting_ids) for t in completion_ids],
            enc.prompt_len,
        )

    def encode_preference(self, prompt: list[dict], response: list[dict] | str) -> Encoded:
        """prompt messages + one response (a string or assistant message list) as one sequence."""
        if isinstance(response, str):
            response = [{"role": "assistant", "content": response}]
        return self.encode(list(prompt) + list(response))

    def encode_response(self, record: dict, key: str) -> Encoded:
        """prompt + response `key` (chosen, rejected, edited) of a preference record.

        From the response's token ids (`<key>_ids`, as rejection sampling writes them) when the record has
        them, so sampled text is never decoded and re-encoded; otherwise from its messages."""
        ids = record.get(f"{key}_ids")
        if ids is not None:
            return self.encode_completion(record["prompt"], ids)
        return self.encode_preference(record["prompt"], record[key])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- identity ---------------------------------------------------------------------------------------
    def template_hash(self) -> str:
        """Hash of the tokenizer's vocabulary + merges, the special-token ids and the template text.

        Goes into every stage's manifest; a stage refuses inputs made with another hash."""
        h = hashlib.sha256()
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        h.update((backend.to_str() if backend is not None else json.dumps(self.tokenizer.get_vocab(), sort_keys=True)).encode())
        h.update(json.dumps([TEMPLATE_NAME, CHAT_TEMPLATE, self.bos_id, self.eot_id, self.pad_id]).encode())
        return h.hexdigest()[:16]


def load_tokenizer(path: str | os.PathLike) -> ChatFormat:
    """Load a local tokenizer folder (or tokenizer.json) and check it is a Llama 3 one. Never downloads."""
    from transformers import PreTrainedTokenizerFast

    path = str(path)
    tj = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
    if not os.path.exists(tj):
        raise ChatFormatError(f"{path}: no tokenizer.json found")
    try:
        tok = PreTrainedTokenizerFast(tokenizer_file=tj)
    except Exception as e:  # a corrupt file: one line, not a traceback
        raise ChatFormatError(f"{tj}: cannot load tokenizer: {str(e).splitlines()[0]}") from None
    return ChatFormat(tok, name=path)


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
