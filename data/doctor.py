"""The doctor: checks a model folder, its tokenizer, a recipe and data files before anything trains on them.

    python -m data.doctor MODEL_OR_RUN [--recipe R] [--data FILE ...] [--fix OUT]
    make doctor MODEL=runs/default/sft/model RECIPE=recipes/default.yaml DATA=conv.jsonl FIX=fixed/

MODEL_OR_RUN is a model folder, a run folder (runs/<name>: every policy folder in it, with the recipe its
manifests recorded), or a tokenizer name (`llama3`, `llama3.1`: the tokenizer checks only). The pipeline
runs it before every training stage and before sampling (pipeline/run.py): an error stops the stage (one
`error:` line, exit code 2), a warning is printed. Exit codes of the command: 0 no error (warnings allowed),
1 errors found, 2 it could not check (a missing folder, a bad recipe).

Every finding has a code, one line, and what to do:

    code               severity  found when
    not_llama3         error     the tokenizer lacks Llama 3's special tokens
    double_bos         warning   the tokenizer adds BOS itself (post-processor or add_bos_token) and the template
                                 writes one: tokenizing the rendered text with the defaults gives two (this project
                                 encodes with add_special_tokens=False)
    pad_missing        error     the vocabulary has no dedicated pad token (<|finetune_right_pad_id|>)
    pad_is_stop        error     a pad the folder declares (tokenizer_config, config, generation_config) is
                                 eos/eot/eom: padding masks the end of turn, and the model never learns to stop
    pad_as_text        error     the declared pad is an ordinary text token, or the pad id appears in data ids
    stop_tokens        error     generation_config.json eos_token_id lacks <|eot_id|> (and <|eom_id|> for llama3.1)
    untrained_special  error     a special token the template or data uses has an embedding or LM-head row whose
                                 norm is far below the median (a warning before a training stage that resets them)
    template_tokens    error     the recipe's llama3.1 template on a tokenizer without <|eom_id|> (3.0 names)
    template_mismatch  error     the recipe's template is not the one the tokenizer's own chat_template is
    template_unknown   warning   the tokenizer's chat_template is no Llama 3 template
    template_date      warning   the tokenizer's llama3.1 template defaults to another date than the recipe's
    model_family       warning   a Llama 3.1+ model (rope_type llama3) with the llama3 (3.0) template
    vocab_size         error     the tokenizer has more tokens than the model has embedding rows
    max_length         error     a stage's max_length exceeds the model's max_position_embeddings
    dtype              warning   float16 on a model trained in bfloat16 (activations overflow)
    pickle_weights     error     no *.safetensors, only pickle weights (*.bin, ...)
    dropout            warning   the model config has dropout > 0 (the stages set model.dropout, default 0)
    quantization       error     the recipe's model.quantization is nf4 and bitsandbytes is missing or has no
                                 backend for this machine's device (nf4_problem: the recipe loader's check too)
    data_special_tokens warning  records with special-token strings in their content (rejected)
    data_overlong      warning   the share of records longer than max_length (dropped)
    data_empty         warning   records with an empty turn (rejected)
    data_duplicates    warning   duplicate records (rejected)
    data_rejected      warning   records rejected for any other defect (counts per code)
    data_unusable      error     no record of the file is usable

`--fix OUT` writes a fixed copy of the model folder to OUT: untrained special-token rows set to the mean
embedding (data/embeddings.py, the function the training stages use), generation_config's stop ids and pad
set to the chat format's, and OUT/doctor_report.json (the findings before and after, what was changed).
Data checks go through the validator (data/validate.py); this module adds no rule of its own for records.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data.chat_format import (DEFAULT_DATE, DEFAULT_TEMPLATE, EOM, EOT, TEMPLATES, TOKENIZER_NAMES, ChatFormat,
                              ChatFormatError, load_tokenizer, saved_chat_template, template_family, tool_args)
from data.formats import DataError, iter_file

ERROR, WARNING = "error", "warning"
TRAINING = ("sft", "reward", "dpo")  # the stages that reset untrained special rows themselves
DEFAULT_DROPOUT = 0.0  # model.dropout: what the stages set every dropout of the policy's config to
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt")

# bitsandbytes (model.quantization nf4; peft imports it too, when it is installed) warns on a CPU, at import, that
# the optional `kernels` package (a faster CPU matmul) is missing: its own CPU kernels run. Kept off stderr, where a
# stage's one `error:` line goes; set here, in the module every entry point imports before bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class DoctorError(ChatFormatError):
    """An error finding before a stage: the stage does not start (a ChatFormatError, so the pipeline prints
    it as one `error:` line and exits 2)."""


@dataclass
class Finding:
    code: str
    severity: str
    message: str  # one line: what is wrong
    fix: str  # one line: what to do

    def line(self) -> str:
        return f"{self.code}: {self.message}; do: {self.fix}"


@dataclass
class Settings:
    """What the doctor checks a folder against: the recipe's values (None: not given, not checked)."""

    template: str | None = None  # model.chat_template
    date: str | None = None  # model.template_date
    dtype: str | None = None  # model.dtype
    dropout: float | None = DEFAULT_DROPOUT  # model.dropout
    quantization: str = "none"  # model.quantization
    max_lengths: dict = field(default_factory=dict)  # "sft.max_length" -> value
    resets_embeddings: bool = False  # the stage about to run resets untrained special rows itself
    source: str = ""  # where these came from, for messages

    @classmethod
    def from_recipe(cls, recipe: dict, stage: str | None = None, source: str = "") -> "Settings":
        """From a recipe as a dict (Recipe.to_dict(), a YAML file's mapping, or the sections of a run's
        manifests). A key it lacks takes the recipe default where this package owns it (template, date,
        dropout) and is not checked otherwise. `stage`: only that stage's max_length."""
        model = recipe.get("model") or {}
        stages = [stage] if stage in TRAINING else [] if stage else list(TRAINING)
        lengths = {f"{s}.max_length": (recipe.get(s) or {}).get("max_length") for s in stages}
        return cls(template=model.get("chat_template", DEFAULT_TEMPLATE), date=model.get("template_date", DEFAULT_DATE),
                   dtype=model.get("dtype"), dropout=model.get("dropout", DEFAULT_DROPOUT),
                   quantization=model.get("quantization") or "none",
                   max_lengths={k: v for k, v in lengths.items() if isinstance(v, int)},
                   resets_embeddings=stage in TRAINING and (recipe.get(stage) or {}).get("init_special_embeddings", True),
                   source=source)


# -- the folder's files ----------------------------------------------------------------------------------
def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _ids(value) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int) and not isinstance(v, bool)] if isinstance(value, list) else []


def dropout_overrides(path: str | os.PathLike, p: float | None) -> dict:
    """{config key: p} for every dropout probability in the folder's config.json (attention_dropout,
    hidden_dropout, *_pdrop, ...), to pass to from_pretrained; {} when p is None (keep the checkpoint's)."""
    if p is None:
        return {}
    return {k: p for k in _dropout_values(_json(Path(path) / "config.json"))}


@functools.lru_cache(maxsize=None)
def nf4_problem(device: str | None = None) -> str | None:
    """Why `model.quantization: nf4` cannot run on this machine, in one line; None when it can. The one check:
    the recipe loader (core.config) refuses nf4 with it and the doctor reports it (code `quantization`).

    nf4 needs bitsandbytes with a backend for the device the stages train on (`device`; default cuda when torch
    sees a GPU, else cpu): on a GPU its native CUDA/ROCm library must have loaded for this torch's CUDA (else
    bitsandbytes keeps a stub that fails at the first matmul, minutes into a stage); on a CPU (recent releases)
    a 4-bit round trip must give the values back. Cached: one import of bitsandbytes per process."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return ("bitsandbytes is not installed (an optional dependency: pip install bitsandbytes, or "
                "make install, whose cpu and gpu extras have it)")
    except Exception as e:  # noqa: BLE001 - a broken install (a native library that does not load, ...)
        return f"bitsandbytes does not import: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    version = getattr(bnb, "__version__", "?")
    if device not in getattr(bnb, "supported_torch_devices", {"cuda"}):  # older releases: CUDA only
        return f"bitsandbytes {version} has no {device} backend (the version make install pins runs nf4 on CPUs too)"
    if device == "cuda":
        from bitsandbytes import cextension

        if cextension.BNB_BACKEND not in ("CUDA", "ROCm") or isinstance(cextension.lib, cextension.ErrorHandlerMockBNBNativeLibrary):
            return (f"bitsandbytes {version} has no CUDA backend here (its backend: {cextension.BNB_BACKEND}; torch CUDA "
                    f"{torch.version.cuda}): install a bitsandbytes wheel built for this CUDA")
        return None
    try:
        import bitsandbytes.functional as bnb_f

        x = torch.linspace(-1, 1, 128, device=device).reshape(2, 64).to(torch.bfloat16)
        packed, state = bnb_f.quantize_4bit(x, quant_type="nf4", quant_storage=torch.bfloat16)
        err = float((bnb_f.dequantize_4bit(packed, state).float() - x.float()).abs().max())
    except Exception as e:  # noqa: BLE001 - whatever the backend raises: one line
        return f"bitsandbytes {version}'s {device} backend fails: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    if not err < 0.2:  # nf4's levels are <= 0.31 x the block's absmax apart: a round trip errs by half that at most
        return f"bitsandbytes {version}'s {device} backend returns wrong nf4 values (round-trip error {err:.3g})"
    return None


def _dropout_values(config: dict) -> dict:
    return {k: v for k, v in config.items() if ("dropout" in k or k.endswith("_pdrop"))
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _safetensors(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def embedding_matrices(folder: str | os.PathLike) -> dict:
    """{"embed_tokens": tensor, "lm_head": tensor (absent when tied)} read from the folder's safetensors alone."""
    from safetensors import safe_open

    out = {}
    for f in _safetensors(Path(folder)):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                if k.endswith("embed_tokens.weight") and "embed_tokens" not in out:
                    out["embed_tokens"] = h.get_tensor(k)
                elif k == "lm_head.weight" or k.endswith(".lm_head.weight"):
                    out["lm_head"] = h.get_tensor(k)
    return out


def _family_of_model(config: dict) -> str | None:
    """llama3.1 for a Llama 3.1+ model (its RoPE scaling is rope_type "llama3"), llama3 for another Llama."""
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key)
        if isinstance(rope, dict) and (rope.get("rope_type") or rope.get("type")) == "llama3":
            return "llama3.1"
    return "llama3" if config.get("model_type") == "llama" else None


# -- the checks ------------------------------------------------------------------------------------------
def diagnose(target: str | os.PathLike, settings: Settings | None = None, data: list[str] = ()) -> tuple[list[Finding], ChatFormat | None]:
    """Every finding for a model folder (or tokenizer name) against `settings`, and the chat format the
    stages would use (None when the tokenizer cannot be used at all)."""
    s = settings or Settings()
    target = str(target)
    folder = None if target in TOKENIZER_NAMES and not os.path.exists(target) else Path(target)
    found: list[Finding] = []
    add = lambda *a: found.append(Finding(*a))  # noqa: E731
    if folder is not None and not folder.is_dir():
        raise DoctorError(f"{target}: no such folder (give a model folder, a run folder, or {' / '.join(TOKENIZER_NAMES)})")
    config = _json(folder / "config.json") if folder else {}
    is_model = bool(config)

    if folder and is_model:  # weights first: without them nothing else about the model can be read
        if not _safetensors(folder):
            pickles = sorted(p.name for pat in PICKLES for p in folder.glob(pat) if not p.name.startswith("training_args"))
            add("pickle_weights", ERROR, f"no *.safetensors weights" + (f", only pickle weights ({', '.join(pickles[:3])})" if pickles else ""),
                "convert once, where the model is trusted: from_pretrained(...).save_pretrained(OUT, safe_serialization=True)"
                " (pickles can run code and are never loaded here)")

    if s.quantization == "nf4" and (why := nf4_problem()):
        add("quantization", ERROR, f"model.quantization nf4: {why}",
            "install bitsandbytes for this machine's device, or model.quantization: none")
    fmt = _tokenizer(target, s, add)
    if fmt is None:
        return found, None
    family = fmt.template
    _check_tokenizer(fmt, folder, config, add)
    _check_template(fmt, folder, config, s, add)
    data_ids: set[int] = set()
    for path in data:
        data_ids |= _check_data(path, fmt, s, config, add)
    if folder and is_model:
        _check_sizes(fmt, folder, config, s, add)
        _check_stop_tokens(fmt, folder, config, family, add)
        if _safetensors(folder):
            _check_embeddings(fmt, folder, data_ids, s, add)
        _check_dropout(config, s, add)
    return found, fmt


def _tokenizer(target: str, s: Settings, add) -> ChatFormat | None:
    """The chat format with the recipe's template; the tokenizer's own family (template_tokens) when the
    recipe's cannot be used."""
    try:
        return load_tokenizer(target, s.template, s.date) if s.template else load_tokenizer(target)
    except ChatFormatError as e:
        msg = str(e)
    if "no dedicated pad token" in msg:
        add("pad_missing", ERROR, f"the vocabulary has no dedicated pad token: {msg.split(': ', 1)[-1]}",
            "use Llama 3's tokenizer (id 128004 <|finetune_right_pad_id|>), never eos or eot as pad")
        return None
    if "needs <|eom_id|>" in msg:
        add("template_tokens", ERROR, f"the recipe's template {s.template} needs {EOM}, and this tokenizer has Llama "
            "3.0's special-token names", "a Llama 3.1+ model's own tokenizer, or model.tokenizer: llama3.1; or "
            "model.chat_template: llama3 for a Llama 3.0 model")
        try:
            return load_tokenizer(target)
        except ChatFormatError:
            return None
    if "not a Llama 3 tokenizer" in msg:
        add("not_llama3", ERROR, msg.split(": ", 1)[-1], "use a Llama 3 model's tokenizer (or model.tokenizer: llama3 / llama3.1)")
        return None
    raise DoctorError(msg)


def _check_tokenizer(fmt: ChatFormat, folder: Path | None, config: dict, add) -> None:
    tok = fmt.tokenizer
    tcfg = _json(folder / "tokenizer_config.json") if folder else {}
    adds = tok("Hi")["input_ids"][:1] == [fmt.bos_id]
    if adds or tcfg.get("add_bos_token") is True:
        how = "its post-processor" if adds else "tokenizer_config.json add_bos_token"
        add("double_bos", WARNING, f"the tokenizer adds <|begin_of_text|> itself ({how}) and the chat template writes "
            "one: tokenizing the rendered text with the defaults gives two BOS",
            "this project encodes with add_special_tokens=False (one BOS); elsewhere tokenize rendered chats with "
            "add_special_tokens=False")
    special = set(tok.added_tokens_decoder)  # the special range (<|...|> tokens)
    stops = {fmt.eos_id: "<|end_of_text|>", fmt.eot_id: EOT, **({fmt.eom_id: EOM} if fmt.eom_id is not None else {})}
    declared = []
    pad = tcfg.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if isinstance(pad, str):
        declared.append(("tokenizer_config.json pad_token", tok.convert_tokens_to_ids(pad), pad))
    if folder:
        for name, data in (("config.json", config), ("generation_config.json", _json(folder / "generation_config.json"))):
            for pid in _ids(data.get("pad_token_id"))[:1]:
                declared.append((f"{name} pad_token_id", pid, tok.convert_ids_to_tokens(pid)))
    for where, pid, text in declared:
        if pid in stops:
            add("pad_is_stop", ERROR, f"{where} is {text} ({pid}), a stop token: padding with it masks the end of "
                "turn and the model never learns to stop", f"set it to {fmt.pad_token} ({fmt.pad_id}) (--fix does)")
        elif pid is not None and pid not in special:
            add("pad_as_text", ERROR, f"{where} is {text!r} ({pid}), an ordinary text token: real text would be "
                "taken for padding", f"set it to {fmt.pad_token} ({fmt.pad_id}) (--fix does)")


def _check_template(fmt: ChatFormat, folder: Path | None, config: dict, s: Settings, add) -> None:
    own_text = saved_chat_template(folder) if folder else None
    own = template_family(own_text)
    used = fmt.template
    if own_text and own is None:
        add("template_unknown", WARNING, "the tokenizer's chat_template is no Llama 3 template: HF/vLLM chat users of "
            f"this folder get another format than the {used} the stages train", "save the trained model with this "
            "project (it writes its template), or fix tokenizer_config.json's chat_template")
    if own and s.template and own[0] != s.template:
        add("template_mismatch", ERROR, f"the recipe's model.chat_template is {s.template}, the tokenizer's own "
            f"chat_template is {own[0]}", f"model.chat_template: {own[0]} (llama3.1 for Llama 3.1/3.2/3.3 models)")
    elif own and own[0] == "llama3.1" == used and own[1] and own[1] != fmt.date:
        add("template_date", WARNING, f"the tokenizer's template defaults to Today Date {own[1]}, the recipe's is {fmt.date}",
            f"model.template_date: \"{own[1]}\" to render what the model saw")
    model_family = _family_of_model(config)
    if model_family == "llama3.1" and used == "llama3":
        add("model_family", WARNING, "a Llama 3.1+ model (rope_type llama3) with the llama3 (3.0) chat template: "
            "Meta post-trained 3.1/3.2/3.3 with the llama3.1 template", "model.chat_template: llama3.1")


def _check_sizes(fmt: ChatFormat, folder: Path, config: dict, s: Settings, add) -> None:
    rows = config.get("vocab_size")
    if isinstance(rows, int) and len(fmt.tokenizer) > rows:
        add("vocab_size", ERROR, f"the tokenizer has {len(fmt.tokenizer)} tokens, the model {rows} embedding rows: "
            "the last ids index past the matrix", "use the model's own tokenizer, or resize the embeddings and train them")
    max_pos = config.get("max_position_embeddings")
    for key, n in s.max_lengths.items():
        if isinstance(max_pos, int) and n > max_pos:
            add("max_length", ERROR, f"{key} {n} > the model's max_position_embeddings {max_pos}",
                f"{key}: {max_pos} or less")
    trained = config.get("dtype") or config.get("torch_dtype")
    if s.dtype == "float16" and trained == "bfloat16":
        add("dtype", WARNING, "model.dtype float16 on a model trained in bfloat16: activations can overflow to inf",
            "model.dtype: bfloat16 (or float32)")


def _check_stop_tokens(fmt: ChatFormat, folder: Path, config: dict, family: str, add) -> None:
    gen = _json(folder / "generation_config.json")
    where = "generation_config.json" if gen else "config.json"
    have = _ids((gen or config).get("eos_token_id"))
    need = [(fmt.eot_id, EOT)] + ([(fmt.eom_id, EOM)] if family == "llama3.1" else [])
    lacking = [f"{name} ({tid})" for tid, name in need if tid not in have]
    if lacking:
        add("stop_tokens", ERROR, f"{where} eos_token_id {have} lacks {' and '.join(lacking)}: generate and vLLM "
            "serving of this folder do not stop at the end of a turn", f"eos_token_id: {fmt.stop_ids} (--fix writes it)")


def _check_embeddings(fmt: ChatFormat, folder: Path, data_ids: set[int], s: Settings, add) -> None:
    from data.embeddings import row_norms, untrained_rows

    ids = template_ids(fmt) | data_ids
    for name, w in embedding_matrices(folder).items():
        norms = row_norms(w)
        bad = untrained_rows(w, ids, norms)
        if bad:
            names = ", ".join(f"{fmt.tokenizer.convert_ids_to_tokens(t)} ({t})" for t in bad[:4]) + (" ..." if len(bad) > 4 else "")
            median = float(norms.median())
            worst = min(float(norms[t]) for t in bad)
            stage = s.resets_embeddings
            add("untrained_special", WARNING if stage else ERROR,
                f"{name} rows of {names} are untrained (norm {worst:.2g} vs median {median:.2g})",
                "the training stage resets them to the mean embedding (init_special_embeddings)" if stage else
                "make doctor MODEL=... FIX=OUT writes a copy with them set to the mean embedding (the stages do the "
                "same when they start: init_special_embeddings)")


def _check_dropout(config: dict, s: Settings, add) -> None:
    on = {k: v for k, v in _dropout_values(config).items() if v > 0}
    if s.dropout is not None and s.dropout > 0:
        add("dropout", WARNING, f"model.dropout {s.dropout}: the stages train the policy with dropout (Llama 3: none; "
            "DPO's policy and reference log-probs then differ by noise)", "model.dropout: 0.0")
    elif on:
        keeps = s.dropout is None
        add("dropout", WARNING, f"config.json has {', '.join(f'{k}={v}' for k, v in on.items())}: "
            + ("the stages keep it (model.dropout: null)" if keeps else f"the stages set it to {s.dropout} (model.dropout); "
               "other tools loading this folder train with it"),
            "model.dropout: 0.0" if keeps else "nothing for this pipeline; set it to 0 in config.json for other tools")


def template_ids(fmt: ChatFormat) -> set[int]:
    """The special tokens the template writes (pad left out: it is never attended to)."""
    ids = set(fmt.formatting_ids) - {fmt.pad_id}
    if fmt.template == "llama3.1" and fmt.python_tag_id is not None:
        ids.add(fmt.python_tag_id)
    return ids


# -- data, through the validator ---------------------------------------------------------------------------
def data_kind(path: str) -> str:
    """sft, preference or prompts, from the file's first readable record."""
    for _, item in iter_file(path):
        if isinstance(item, dict):
            if "chosen" in item or "completions" in item:
                return "preference"
            if "messages" in item and "prompt" not in item or "completion" in item or "text" in item:
                return "sft"
            return "prompts"
    return "sft"


def _check_data(path: str, fmt: ChatFormat, s: Settings, config: dict, add) -> set[int]:
    """Findings from the validator's report on one data file; returns the special ids its records use."""
    from data.validate import load_preferences, load_prompts, load_sft

    if not os.path.isfile(path):
        raise DoctorError(f"{path}: data file not found")
    kind = data_kind(path)
    wanted = {"sft": ["sft.max_length"], "preference": ["reward.max_length", "dpo.max_length"], "prompts": []}[kind]
    lengths = [s.max_lengths[k] for k in wanted if k in s.max_lengths]
    max_pos = config.get("max_position_embeddings") if isinstance(config.get("max_position_embeddings"), int) else 8192
    max_length = min(lengths) if lengths else max_pos
    loader = {"sft": load_sft, "preference": load_preferences, "prompts": load_prompts}[kind]
    try:
        records, report = loader(path, fmt, max_length=max_length)
    except DataError as e:
        raise DoctorError(f"{path}: {e}") from None
    n = max(report.n_in, 1)
    c = report.counts

    def share(code):
        return f"{c[code]} of {report.n_in} records ({100 * c[code] / n:.1f}%)"

    def example(code):
        ex = report.examples.get(code) or []
        return f" (line {ex[0][1]}: {ex[0][2]})" if ex else ""

    if c.get("special_token_in_content"):
        add("data_special_tokens", WARNING, f"{path}: {share('special_token_in_content')} have special-token strings in "
            f"their content, rejected{example('special_token_in_content')}", "remove them from the text; a tool call is an "
            "assistant message with tool_calls (llama3.1), not <|python_tag|> in its content")
        if any(fmt.pad_token in m for _, _, m in report.examples.get("special_token_in_content", [])):
            add("pad_as_text", ERROR, f"{path}: the pad token {fmt.pad_token} appears as text in the data",
                "remove it: padding is added by the collator, never written in records")
    if c.get("overlong"):
        add("data_overlong", WARNING, f"{path}: {share('overlong')} are longer than max_length {max_length} tokens "
            "(dropped)", "raise the stage's max_length (within max_position_embeddings), or overlong: truncate")
    if c.get("empty_response"):
        add("data_empty", WARNING, f"{path}: {share('empty_response')} have an empty turn (rejected){example('empty_response')}",
            "drop or fill those turns")
    if c.get("duplicate"):
        add("data_duplicates", WARNING, f"{path}: {share('duplicate')} repeat an earlier record (rejected)",
            "deduplicate the file")
    other = {k: v for k, v in c.items() if k not in ("special_token_in_content", "overlong", "empty_response",
                                                      "duplicate", "truncated")}
    if other:
        first = next(iter(other))
        add("data_rejected", WARNING, f"{path}: rejected: " + ", ".join(f"{k} {v}" for k, v in other.items())
            + example(first), f"python -m data.inspect {path} --tokenizer ... shows a record; the validator's codes "
            "are in data/validate.py")
    if report.n_in and not records:
        add("data_unusable", ERROR, f"{path}: none of its {report.n_in} records is usable", "see the data findings above")
    used: set[int] = set()
    special = set(fmt.tokenizer.added_tokens_decoder)
    for r in records:
        if kind == "sft":
            ids = r["encoded"].input_ids
        elif kind == "preference":
            ids = [t for k in ("edited", "chosen", "rejected") if r.get(k) is not None for t in fmt.encode_response(r, k).input_ids]
        else:
            ids = fmt.encode_prompt(r["prompt"], **tool_args(r))
        used.update(t for t in ids if t in special)
    if fmt.pad_id in used:
        add("pad_as_text", ERROR, f"{path}: the pad id {fmt.pad_id} appears inside records' token ids",
            "regenerate those ids: a pad inside a sequence is attended to as if it were text")
    return used - {fmt.pad_id}


# -- the fix ------------------------------------------------------------------------------------------------
def fix(folder: str | os.PathLike, out: str | os.PathLike, settings: Settings | None = None, data: list[str] = ()) -> dict:
    """Write a fixed copy of `folder` to `out` (see the module doc); returns the report also written to
    out/doctor_report.json."""
    import torch
    from transformers import AutoModelForCausalLM

    from data.embeddings import reset_untrained_rows

    folder, out = Path(folder), Path(out)
    if out.resolve() == folder.resolve():
        raise DoctorError(f"{out}: --fix writes a new folder, not over the model it fixes")
    before, fmt = diagnose(folder, settings, data)
    if fmt is None or any(f.code == "pickle_weights" for f in before):
        raise DoctorError(f"{folder}: cannot fix: " + "; ".join(f.line() for f in before if f.severity == ERROR))
    data_ids = set()
    for path in data:
        data_ids |= _check_data(path, fmt, settings or Settings(), {}, lambda *a: None)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto", use_safetensors=True, trust_remote_code=False)
    ids = sorted(template_ids(fmt) | data_ids)
    reset = reset_untrained_rows(model, ids)
    changed = {"embedding_rows_reset": {t: fmt.tokenizer.convert_ids_to_tokens(t) for t in reset}}
    codes = {f.code for f in before}
    gen = model.generation_config
    if "stop_tokens" in codes:
        changed["eos_token_id"] = [_ids(gen.eos_token_id), list(fmt.stop_ids)]
        gen.eos_token_id = list(fmt.stop_ids)
    if codes & {"pad_is_stop", "pad_as_text"}:
        changed["pad_token_id"] = [model.config.pad_token_id, fmt.pad_id]
        model.config.pad_token_id = gen.pad_token_id = fmt.pad_id
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        model.save_pretrained(str(out), safe_serialization=True)
    fmt.tokenizer.save_pretrained(str(out))  # pad, eos and the chat template of the format
    after, _ = diagnose(out, settings, data)
    report = {"source": str(folder), "template": fmt.template, "changed": changed,
              "before": [asdict(f) for f in before], "after": [asdict(f) for f in after]}
    (out / "doctor_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


# -- before a stage ------------------------------------------------------------------------------------------
def before_stage(recipe, stage: str, inputs: dict, show: bool = True) -> list[Finding]:
    """The doctor on the model a stage starts from (sft, reward, dpo: `model`; sample: `policy`), against the
    recipe. Warnings are printed (when `show`); an error raises DoctorError: the stage does not start. The
    stage's data is checked by the stage's own validator report."""
    folder = inputs.get("policy") if stage == "sample" else inputs.get("model") if stage in TRAINING else None
    if folder is None:
        return []
    settings = Settings.from_recipe(recipe.to_dict() if hasattr(recipe, "to_dict") else recipe, stage,
                                    getattr(recipe, "source", ""))
    found, _ = diagnose(folder, settings)
    if show:
        for f in found:
            if f.severity == WARNING:
                print(f"[{stage}] doctor: warning: {f.line()}", file=sys.stderr, flush=True)
    errors = [f for f in found if f.severity == ERROR]
    if errors:
        more = f" (+{len(errors) - 1} more: make doctor MODEL={folder} RECIPE={settings.source or '...'})" if len(errors) > 1 else ""
        raise DoctorError(f"doctor: {folder}: {errors[0].line()}{more}")
    return found


# -- the command -------------------------------------------------------------------------------------------
def _run_folders(run: Path) -> list[Path]:
    """The policy folders of a run folder (runs/<name>): <stage>/model and round<r>/<stage>/model."""
    out = []
    for cfg in sorted(run.glob("*/model/config.json")) + sorted(run.glob("round*/*/model/config.json")):
        archs = _json(cfg).get("architectures") or []
        if any(str(a).endswith("ForCausalLM") for a in archs):
            out.append(cfg.parent)
    return out


def _run_recipe(run: Path) -> dict:
    """The recipe sections a run's manifests recorded (each stage's resolved config)."""
    recipe: dict = {}
    for m in sorted(run.glob("*/manifest.json")) + sorted(run.glob("round*/*/manifest.json")):
        for k, v in (_json(m).get("config") or {}).items():
            if isinstance(v, dict):
                recipe.setdefault(k, {}).update(v)
    return recipe


def _read_recipe(path: str) -> dict:
    """A recipe YAML as a mapping (the typed loader lives in core/, above this package: the doctor reads the
    keys it checks and leaves the rest to the pipeline's own checks)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError:
        raise DoctorError(f"{path}: recipe file not found") from None
    except yaml.YAMLError as e:
        raise DoctorError(f"{path}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise DoctorError(f"{path}: a recipe is a mapping")
    template = (data.get("model") or {}).get("chat_template", DEFAULT_TEMPLATE)
    if template not in TEMPLATES:
        raise DoctorError(f"{path}: model.chat_template must be one of {', '.join(TEMPLATES)}; got {template!r}")
    return data


def _print(target, fmt, found: list[Finding]) -> None:
    what = f"template {fmt.template}" + (f" ({fmt.date})" if fmt and fmt.template == "llama3.1" else "") if fmt else "no usable tokenizer"
    print(f"doctor: {target}: {len(fmt.tokenizer) if fmt else '?'} tokens, {what}")
    for f in found:
        print(f"  {f.severity:7s} {f.code}: {f.message}")
        print(f"          do: {f.fix}")
    n_err = sum(f.severity == ERROR for f in found)
    n_warn = len(found) - n_err
    print(f"doctor: {target}: " + (f"{n_err} error{'s' * (n_err != 1)}, {n_warn} warning{'s' * (n_warn != 1)}" if found else "no findings"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.doctor", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 3)[3])
    ap.add_argument("target", metavar="MODEL_OR_RUN", help="a model folder, a run folder, or a tokenizer name (llama3, llama3.1)")
    ap.add_argument("--recipe", help="the recipe to check against (template, date, dtype, dropout, max_length)")
    ap.add_argument("--data", action="append", default=[], help="a data file to check (repeatable)")
    ap.add_argument("--fix", metavar="OUT", help="write a fixed copy of the model folder here, with doctor_report.json")
    args = ap.parse_args(argv)
    try:
        target = Path(args.target)
        recipe = _read_recipe(args.recipe) if args.recipe else None
        folders = [args.target]
        if target.is_dir() and not (target / "config.json").exists() and not (target / "tokenizer.json").exists():
            folders = [str(p) for p in _run_folders(target)]
            if not folders:
                raise DoctorError(f"{target}: neither a model folder nor a run folder with model folders")
            if recipe is None:
                recipe = _run_recipe(target) or None
        settings = Settings.from_recipe(recipe, source=args.recipe or str(target)) if recipe is not None else Settings()
        if args.fix:
            if len(folders) != 1 or args.target in TOKENIZER_NAMES and not target.exists():
                raise DoctorError("--fix takes one model folder")
            report = fix(folders[0], args.fix, settings, args.data)
            print(f"doctor: wrote {args.fix}: {json.dumps(report['changed'])}")
            found = [Finding(**f) for f in report["after"]]
            _print(args.fix, load_tokenizer(args.fix, settings.template, settings.date) if settings.template else load_tokenizer(args.fix), found)
            return 1 if any(f.severity == ERROR for f in found) else 0
        errors = 0
        for i, folder in enumerate(folders):
            found, fmt = diagnose(folder, settings, args.data if i == 0 else ())
            _print(folder, fmt, found)
            errors += sum(f.severity == ERROR for f in found)
        return 1 if errors else 0
    except (DoctorError, ChatFormatError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
