"""The training config: one typed schema, YAML files, and `--set key=value` overrides.

Precedence: built-in defaults < YAML file < command-line options and --set.
Every field's help text doubles as the comment in `lqmf config create` templates.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lqmf.core.distributed import QUANT_STORAGE_DTYPES
from lqmf.core.errors import InputError, NotFoundError, did_you_mean
from lqmf.core.memory_plan import STRATEGIES, parse_size
from lqmf.core.names import validate_name
from lqmf.core.schedule import head_learning_rate

TASK_ALIASES = {"instruction": "instruction_following", "instruct": "instruction_following"}
TASKS = ("chat", "instruction_following", "classification", "summarization")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
OVERLONG_POLICIES = ("truncate", "drop", "error")
EVAL_STRATEGIES = ("epoch", "steps", "no")
DEVICES = ("auto", "cpu", "cuda", "mps")
SWITCHES = ("auto", "on", "off")
ON_OFF = ("off", "on")
KEPT_COUNTS = ("kept_layers", "kept_mlps")  # off | auto | a number of layers


def _opt(default: Any, help_text: str, **choices: Any) -> Any:
    metadata = {"help": help_text, **choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    # What to train
    job_name: str | None = _opt(None, "Adapter name; default <model>-<task>-<5 chars of the dataset's sha256>")
    base_model: str | None = _opt(None, "Model alias (lqmf models list), hub id or local folder")
    task_type: str | None = _opt(None, "chat | instruction_following | classification | summarization",
                                 choices=TASKS)
    dataset_path: str | None = _opt(None, "CSV, JSONL or JSON file in the task's format")
    # LoRA
    lora_r: int = _opt(16, "LoRA rank")
    lora_alpha: int = _opt(32, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = _opt(0.05, "Dropout on the LoRA path")
    target_modules: list[str] | None = _opt(None, "Modules to adapt; default: the model family's list")
    # Optimisation
    learning_rate: float | None = _opt(
        None, "Peak learning rate; default 2e-4, or 1e-3 for classification")
    head_learning_rate: float | None = _opt(
        None, "Classification only: the classifier head's learning rate (it starts from random); "
        "default 10 x learning_rate")
    num_train_epochs: float | None = _opt(
        None, "Passes over the training split; default 3, more on small sets so that the run has at least "
        "100 optimizer steps (at most 20 epochs)")
    max_steps: int = _opt(-1, "Stop after this many optimizer steps (-1: use num_train_epochs)")
    per_device_train_batch_size: int = _opt(2, "Micro-batch size (sequences per forward pass)")
    gradient_accumulation_steps: int | None = _opt(
        None, "Micro-batches per optimizer step; default 8, fewer on small sets so that an epoch has at "
        "least 10 optimizer steps")
    max_seq_length: int = _opt(512, "Longest example in tokens; see overlong")
    overlong: str = _opt("truncate", "What to do with examples over max_seq_length: truncate | drop | error",
                         choices=OVERLONG_POLICIES)
    warmup_ratio: float = _opt(0.03, "Fraction of steps spent warming the learning rate up")
    lr_scheduler_type: str = _opt("cosine", "linear | cosine | constant | constant_with_warmup | ...",
                                  choices=SCHEDULERS)
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 disables)")
    # Memory
    use_gradient_checkpointing: bool = _opt(True, "Recompute activations in backward to save memory")
    use_4bit_quantization: bool = _opt(True, "QLoRA: load the base in 4-bit NF4 (bitsandbytes)")
    offload_activations: str = _opt(
        "auto", "Keep the checkpointed activations in pinned CPU memory during each step (CUDA, with gradient "
        "checkpointing): auto | on | off; auto: when that lets a larger micro-batch fit the budget", choices=SWITCHES)
    packing: str = _opt(
        "auto", "Pack several examples into each sequence of up to max_seq_length tokens, attention kept inside "
        "each example (causal tasks): auto | on | off; auto: when the examples' mean length is at most half of "
        "max_seq_length", choices=SWITCHES)
    tiled_mlp: str = _opt(
        "auto", "Run each block's MLP over the micro-batch's tokens 2048 at a time, each tile recomputed in backward "
        "(with gradient checkpointing): auto | on | off; auto: when the run would not fit the budget without",
        choices=SWITCHES)
    kept_layers: str = _opt(
        "off", "Decoder layers whose activations stay for backward (in pinned CPU memory when activations are "
        "offloaded) instead of being recomputed, spread over the stack, with gradient checkpointing: off | auto | "
        "a number; auto: as many as fit the budget on the device, none where activations are offloaded (kept "
        "in CPU memory they ran 8-9% slower than recomputed on an H100)")
    kept_mlps: str = _opt(
        "off", "Decoder layers whose MLP keeps its gate and up outputs on the device for backward, so that the "
        "layer's recomputation stops before its MLP (with gradient checkpointing, not with the tiled MLP): off | "
        "auto | a number; auto: as many as fit the budget at the chosen micro-batch (under an 8 GB cap the small "
        "micro-batches that leave room for them ran slower on an H100)")
    recompute_lora_dropout: str = _opt(
        "auto", "Recompute the LoRA layers' dropout in backward instead of keeping its output and mask (with LoRA "
        "dropout): auto | on | off; auto: kept where that fits the memory budget at the chosen micro-batch (a "
        "fifth less host time a micro-batch, measured on the CPU), recomputed where it does not or no budget is "
        "known; moot with the fused kernels, which draw the mask inside the LoRA product and keep nothing",
        choices=SWITCHES)
    fused_kernels: str = _opt(
        "auto", "liger-kernel's fused RMSNorm, SiLU-multiply and RoPE in training (CUDA), with LQMF's NF4 dequantize "
        "and LoRA dropout kernels: auto | on | off; auto: on "
        "for a single-GPU run without the tiled MLP (+29% tokens/s measured on an H100); elsewhere PyTorch's",
        choices=SWITCHES)
    gpu_memory_cap: str | None = _opt(
        None, "Cap PyTorch's allocator at this size on each GPU (every process of a multi-GPU run), e.g. 7.3GB to "
        "behave as an 8 GB card; also the budget when max_memory is not set")
    device: str = _opt("auto", "auto | cpu | cuda | mps", choices=DEVICES)
    gpus: str | None = _opt(None, "Train on this many GPUs, one process each, or all (default: one device)")
    strategy: str = _opt("auto", "With several GPUs: ddp (each GPU holds the 4-bit model) | fsdp (sharded) | "
                         "auto (ddp when it fits each GPU)", choices=STRATEGIES)
    bnb_4bit_quant_storage: str = _opt(
        "auto", "Storage dtype of 4-bit weights: auto (uint8; under FSDP the compute dtype) | uint8 | bfloat16 | "
        "float16 | float32", choices=("auto", *QUANT_STORAGE_DTYPES))
    max_memory: str | None = _opt(
        None, "Memory budget for picking the micro-batch, e.g. 7.5GB (default: the GPU's free memory; "
        "on the CPU, no limit)")
    # Data, evaluation, checkpoints
    seed: int = _opt(42, "Seed for the split, shuffling and LoRA init")
    validation_split: float = _opt(0.1, "Fraction held out for validation (0 disables)")
    eval_strategy: str = _opt("epoch", "When to evaluate: epoch | steps | no", choices=EVAL_STRATEGIES)
    eval_steps: int = _opt(0, "With eval_strategy=steps: evaluate every N optimizer steps")
    eval_at_start: bool = _opt(True, "Evaluate the untrained base first, to show what training changed")
    save_steps: int = _opt(0, "Also checkpoint every N optimizer steps (0: at each epoch end only)")
    logging_steps: int = _opt(1, "Log metrics every N optimizer steps")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- values


def normalize_task(task: str) -> str:
    name = task.strip().lower().replace("-", "_")
    name = TASK_ALIASES.get(name, name)
    if name not in TASKS:
        raise InputError(f"unknown task '{task}'{did_you_mean(name, TASKS)}; choose one of {', '.join(TASKS)}")
    return name


def _field_map() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _type_of(f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, optional) for a field's annotation."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    origin = typing.get_origin(hint)
    return (origin or hint), optional


def coerce_value(key: str, value: Any, source: str) -> Any:
    """Check and convert one value for key; errors name the key and where it came from."""
    fields = _field_map()
    if key not in fields:
        raise InputError(f"{source}: unknown key '{key}'{did_you_mean(key, fields)}")
    f = fields[key]
    kind, optional = _type_of(f)
    if value is None:
        if optional:
            return None
        raise InputError(f"{source}: '{key}' must not be empty")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise InputError(f"{source}: '{key}' must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int | str | float):
            raise InputError(f"{source}: '{key}' must be an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise InputError(f"{source}: '{key}' must be an integer, got {value!r}") from None
        if not number.is_integer():
            raise InputError(f"{source}: '{key}' must be an integer, got {value!r}")
        value = int(number)
    elif kind is float:
        if isinstance(value, bool):
            raise InputError(f"{source}: '{key}' must be a number, got {value!r}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{source}: '{key}' must be a number, got {value!r}") from None
    elif kind is list:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise InputError(f"{source}: '{key}' must be a list of names, got {value!r}")
        if not value:
            raise InputError(f"{source}: '{key}' must not be an empty list")
    elif kind is str:
        if isinstance(value, bool) and (f.metadata.get("choices") in (SWITCHES, ON_OFF) or key in KEPT_COUNTS):
            # YAML: on/off are booleans
            value = "on" if value else "off"
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise InputError(f"{source}: '{key}' must be text, got {value!r}")
        value = str(value)
    choices = f.metadata.get("choices")
    if key == "task_type":
        try:
            value = normalize_task(value)
        except InputError as err:
            raise InputError(f"{source}: {err.message}") from None
    elif choices and value not in choices:
        raise InputError(
            f"{source}: '{key}' must be one of {', '.join(choices)}, got {value!r}{did_you_mean(value, choices)}"
        )
    _check_range(key, value, source)
    return value


# The range of every numeric key: (lowest, highest, whether the lowest itself is allowed). Floats must
# also be finite. Upper bounds are far past any sensible run; they catch typos and overflow.
_RANGES: dict[str, tuple[float, float, bool]] = {
    "lora_r": (1, 4096, True),
    "lora_alpha": (1, 1_000_000, True),
    "lora_dropout": (0, 0.999999, True),
    "learning_rate": (0, 1, False),
    "head_learning_rate": (0, 1, False),
    "num_train_epochs": (0, 100_000, False),
    "max_steps": (-1, 1_000_000_000, True),
    "per_device_train_batch_size": (1, 65_536, True),
    "gradient_accumulation_steps": (1, 65_536, True),
    "max_seq_length": (1, 1_048_576, True),
    "warmup_ratio": (0, 0.999999, True),
    "weight_decay": (0, 100, True),
    "max_grad_norm": (0, 1_000_000, True),
    "seed": (0, 2**32 - 1, True),
    "validation_split": (0, 0.999999, True),
    "eval_steps": (0, 1_000_000_000, True),
    "save_steps": (0, 1_000_000_000, True),
    "logging_steps": (1, 1_000_000_000, True),
}


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


def _check_range(key: str, value: Any, source: str) -> None:
    limits = _RANGES.get(key)
    if limits is not None and value is not None:
        low, high, low_allowed = limits
        if not math.isfinite(value):
            raise InputError(f"{source}: '{key}' must be a finite number, got {value!r}")
        if key == "max_steps" and value == 0 or value < low or (value == low and not low_allowed) or value > high:
            if key == "max_steps":
                wanted = f"-1 (train num_train_epochs) or from 1 to {_number(high)}"
            elif high < 1:
                wanted = f"in [{_number(low)}, 1)"
            elif low_allowed:
                wanted = f"from {_number(low)} to {_number(high)}"
            else:
                wanted = f"greater than {_number(low)} and at most {_number(high)}"
            raise InputError(f"{source}: '{key}' must be {wanted}, got {value!r}")
    if key in ("max_memory", "gpu_memory_cap") and value is not None:
        try:
            parse_size(value)
        except ValueError as err:
            raise InputError(f"{source}: '{key}': {err}") from None
    if key == "gpus" and value is not None and value.strip().lower() != "all":
        if not value.strip().isdigit() or int(value) < 1:
            raise InputError(f"{source}: 'gpus' must be a number of GPUs (at least 1) or all, got {value!r}")
    if key in KEPT_COUNTS and value is not None and value not in ("off", "auto") and not value.isdigit():
        raise InputError(f"{source}: '{key}' must be off, auto or a number of layers, got {value!r}")
    if key == "job_name" and value is not None:
        try:
            validate_name(value)
        except InputError as err:
            raise InputError(f"{source}: 'job_name': {err.message}") from None


def parse_set_options(pairs: list[str]) -> dict[str, Any]:
    """--set key=value pairs; values are parsed as YAML scalars or lists."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise InputError(f"--set '{pair}': expected key=value")
        key, raw = pair.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out[key] = coerce_value(key, value, f"--set {key}")
    return out


# ----------------------------------------------------------------------------- files


def config_path(configs_dir: Path, name_or_path: str) -> Path:
    """A saved config by name (configs/NAME.yaml) or a path to a YAML/JSON file."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml", ".json") or "/" in name_or_path:
        return candidate
    validate_name(name_or_path, "config")
    return configs_dir / f"{name_or_path}.yaml"


def new_config_path(configs_dir: Path, name: str) -> Path:
    """configs/NAME.yaml for a config to create: a plain name (a .yaml suffix is allowed), never a path."""
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in (".yaml", ".yml") else name
    return configs_dir / f"{validate_name(stem, 'config')}.yaml"


def read_config_file(path: Path) -> dict[str, Any]:
    """Read and check a YAML (or JSON) config file into a dict of valid keys."""
    if not path.is_file():
        raise NotFoundError(f"config '{path}' not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else (f" line {err.lineno}" if hasattr(err, "lineno") else "")
        problem = getattr(err, "problem", None) or getattr(err, "msg", None) or "invalid syntax"
        raise InputError(f"{path}:{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return {key: coerce_value(str(key), value, str(path)) for key, value in data.items()}


def resolve_config(file_values: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < file values < overrides (None overrides mean 'not given')."""
    values = {**file_values, **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(**values)


DEFAULT_LEARNING_RATE = {"classification": 1e-3}
GENERATIVE_LEARNING_RATE = 2e-4


def check_complete(config: TrainConfig) -> None:
    """Fail unless model, task and dataset are known; fill in task-dependent defaults."""
    missing = [k for k in ("base_model", "task_type", "dataset_path") if getattr(config, k) in (None, "")]
    if missing:
        raise InputError(
            f"missing {', '.join(missing)}: give MODEL DATASET TASK on the command line or set them in the config"
        )
    if config.eval_strategy == "steps" and config.eval_steps < 1:
        raise InputError("eval_strategy=steps needs eval_steps of at least 1 (now "
                         f"{config.eval_steps}); set eval_steps or eval_strategy=epoch")
    fill_task_defaults(config)


def fill_task_defaults(config: TrainConfig) -> None:
    """The learning rates the task decides (when the config names its task)."""
    if config.task_type is None:
        return
    if config.learning_rate is None:
        config.learning_rate = DEFAULT_LEARNING_RATE.get(config.task_type, GENERATIVE_LEARNING_RATE)
    config.head_learning_rate = head_learning_rate(config.task_type, config.learning_rate,
                                                   config.head_learning_rate)


def unfilled_note(config: TrainConfig) -> str | None:
    """What the keys still empty after fill_task_defaults wait for, as one comment line (None: none are)."""
    waiting = {"learning_rate": "the task (2e-4; 1e-3 for classification)",
               "gradient_accumulation_steps": "the data set's size (the small-data schedule)",
               "num_train_epochs": "the data set's size (the small-data schedule)"}
    empty = [key for key in waiting if getattr(config, key) is None]
    if not empty:
        return None
    return "# chosen when training starts: " + "; ".join(f"{key} from {waiting[key]}" for key in empty)


def dump_config(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def template(task: str | None = None, model: str | None = None, name: str | None = None) -> str:
    """A commented YAML template with every key at its default."""
    lines = [
        "# LQMF training config. Use it with: lqmf train --config <name> [MODEL DATASET TASK]",
        "# Precedence: built-in defaults < this file < command-line options and --set key=value.",
        "# Remove a key to use its default; `lqmf config validate <name>` checks the file.",
        "",
    ]
    given = {"job_name": name, "task_type": normalize_task(task) if task else None, "base_model": model}
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        value = given.get(f.name) or default
        rendered = yaml.safe_dump({f.name: value}, default_flow_style=True, width=1000).strip()
        if rendered.startswith("{") and rendered.endswith("}"):
            rendered = rendered[1:-1]
        lines.append(f"# {f.metadata['help']}")
        lines.append(rendered)
    return "\n".join(lines) + "\n"
