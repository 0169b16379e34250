"""A tiny Llama-3-architecture model and a tokenizer trained locally, for the embedded default recipe.

The tokenizer is a byte-level BPE with Llama 3's pre-tokenizer regex and Llama 3's special tokens
(`<|begin_of_text|>`, `<|start_header_id|>`, `<|end_header_id|>`, `<|eot_id|>`, `<|end_of_text|>`, and the
pad token `<|finetune_right_pad_id|>`), trained on the task's texts. The model is `LlamaForCausalLM` with
grouped-query attention, RoPE theta 500,000, SwiGLU and RMSNorm (eps 1e-5), no biases, randomly
initialised from a seed; head_dim is 32 (vLLM's CPU backend needs >= 32). Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from data.chat_format import BOS, EOS, EOT, END_HEADER, PAD_CANDIDATES, START_HEADER, load_tokenizer

# Llama 3's pre-tokenizer split pattern (tiktoken's cl100k-style regex with 1-3 digit numbers).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = [BOS, EOS, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>", PAD_CANDIDATES[0],
            "<|reserved_special_token_2|>", START_HEADER, END_HEADER, "<|eom_id|>", EOT]


def train_tokenizer(texts: list[str], out_dir: str | os.PathLike, vocab_size: int = 1024):
    """Train and save a Llama-3-style tokenizer on `texts`; returns its ChatFormat."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


def make_model(fmt, out_dir: str | os.PathLike, cfg, seed: int = 0):
    """Create and save (safetensors) a randomly initialised tiny Llama for the tokenizer of `fmt`."""
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
        rope_theta=500000.0,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=fmt.bos_id,
        eos_token_id=[fmt.eot_id, fmt.eos_id],
        pad_token_id=fmt.pad_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=fmt.bos_id, eos_token_id=[fmt.eot_id, fmt.eos_id],
                                               pad_token_id=fmt.pad_id)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    fmt.tokenizer.save_pretrained(str(out_dir))
    return model
