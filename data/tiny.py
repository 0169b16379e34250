"""A tiny Llama-3-architecture model and a tokenizer trained locally, for the embedded default recipe.

The tokenizer is a byte-level BPE with Llama 3's pre-tokenizer regex and Llama 3's special tokens
(`<|begin_of_text|>`, `<|start_header_id|>`, `<|end_header_id|>`, `<|eot_id|>`, `<|end_of_text|>`, and the
pad token `<|finetune_right_pad_id|>`), trained on the task's texts. The model is `LlamaForCausalLM` with
grouped-query attention, RoPE theta 500,000, SwiGLU and RMSNorm (eps 1e-5), no biases, randomly
initialised from a seed; head_dim is 32 (vLLM's CPU backend needs >= 32). `pretrain` then gives it a short
plain-text pretraining (no chat format), so that, like a real base model, it can read and copy words
before SFT. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from data.chat_format import (BOS, DEFAULT_DATE, DEFAULT_TEMPLATE, EOS, EOT, END_HEADER, PAD_CANDIDATES, START_HEADER,
                              ChatFormat, ChatFormatError, llama3_tokenizer_dir, load_tokenizer)  # noqa: F401 (llama3_tokenizer_dir: moved there)

# Llama 3's pre-tokenizer split pattern (tiktoken's cl100k-style regex with 1-3 digit numbers).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = [BOS, EOS, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>", PAD_CANDIDATES[0],
            "<|reserved_special_token_2|>", START_HEADER, END_HEADER, "<|eom_id|>", EOT]


def train_tokenizer(texts: list[str], out_dir: str | os.PathLike, vocab_size: int = 1024, source: str | None = None,
                    template: str | None = None, date: str | None = None):
    """Train and save a Llama-3-style tokenizer on `texts`; returns its ChatFormat (for `template`/`date`,
    the recipe's model.chat_template/template_date, saved with it).

    `source` (model.tokenizer): copy that tokenizer instead: a name `load_tokenizer` resolves (`llama3`,
    `llama3.1`: Meta's 128k vocabulary) or a folder with a tokenizer.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if source:
        try:
            fmt = load_tokenizer(source, template, date)
        except ChatFormatError as e:
            raise ChatFormatError(f"model.tokenizer: {e}") from None
        return _saved(fmt, out_dir, template, date)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # Merges are learned on the words alone (spaces turned into newlines), so a word after a space is
    # "Ġ" + the same token as the word at the start of an answer: copying a word from the prompt is then a
    # plain look-up for a tiny model. The format's own pieces ("\n\n", role names) get single tokens.
    words_only = [t.replace(" ", "\n") for t in texts]
    tok.train_from_iterator(words_only + ["\n\n", "system", "user", "assistant"] * 50, trainer)
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD_CANDIDATES[0])
    return _saved(ChatFormat(fast, name=str(out_dir), template=template or DEFAULT_TEMPLATE, date=date or DEFAULT_DATE),
                  out_dir, template, date)


def _saved(fmt, out_dir, template, date):
    """Save the tokenizer (with its format's chat template) and load it back, as every stage will."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fmt.tokenizer.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir, template, date)


def make_model(fmt, out_dir: str | os.PathLike, cfg, seed: int = 0, texts=None):
    """Create a tiny Llama for the tokenizer of `fmt`, pretrain it on `texts` (if given), save (safetensors)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    vocab = len(fmt.tokenizer)
    vocab = (vocab + 63) // 64 * 64
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=getattr(cfg, "rope_theta", 500000.0),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=getattr(cfg, "tie_word_embeddings", False),
        bos_token_id=fmt.bos_id,
        eos_token_id=list(fmt.stop_ids),  # eot (+ eom for llama3.1) and eos: a served model stops at a turn's end
        pad_token_id=fmt.pad_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)  # initialised on the CPU: the same weights on every host
    if torch.cuda.is_available():  # pretraining and the prepare stage's evaluation on the GPU
        model.to("cuda")
    model.generation_config = GenerationConfig(bos_token_id=fmt.bos_id, eos_token_id=list(fmt.stop_ids),
                                               pad_token_id=fmt.pad_id)
    if texts is not None and cfg.pretrain_steps > 0:
        model.pretrain_losses = pretrain(model, fmt, texts, cfg.pretrain_steps, cfg.pretrain_lr, seed=seed)
    if getattr(cfg, "dtype", "float32") != "float32":  # saved in the recipe's dtype (bf16: half the bytes)
        model.to(getattr(torch, cfg.dtype))
    model.save_pretrained(str(out_dir), safe_serialization=True)
    fmt.tokenizer.save_pretrained(str(out_dir))
    return model


def pretrain(model, fmt, texts, steps: int, lr: float, batch_size: int = 32, seed: int = 0) -> list[float]:
    """Next-token pretraining on plain texts (every token a label): the tiny base model's "pretraining".

    `texts(rng)` returns one training text. Returns the loss curve (one value per step)."""
    import random

    import torch

    from data.chat_format import pad_batch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    losses = []
    for _ in range(steps):
        seqs = [[fmt.bos_id] + fmt.text_ids(texts(rng)) + [fmt.eos_id] for _ in range(batch_size)]
        ids = torch.tensor(pad_batch(seqs, fmt.pad_id), device=model.device)
        attn = torch.tensor(pad_batch([[1] * len(x) for x in seqs], 0), device=model.device)
        loss = model(input_ids=ids, attention_mask=attn, labels=ids.masked_fill(attn == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses
