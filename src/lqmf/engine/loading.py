"""Model and tokenizer loading: the one place that picks device, dtype and quantization."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from lqmf.core.errors import InputError, RuntimeFailure
from lqmf.core.models import ResolvedModel, require_downloadable
from lqmf.core.progress import phase

CLASSIFIER_HEADS = ["classifier", "score"]


# Advisory notices that libraries give about LQMF's own calls, not about the user's model or data (seen in
# the test suite with the filters off, or printed by bitsandbytes for every QLoRA forward): silenced by
# message; every other warning shows.
QUIET_WARNINGS = (
    (FutureWarning, r"`(gradient_checkpointing_enable|is_gradient_checkpointing)` is deprecated"),
    (UserWarning, r"Input type into Linear4bit is torch\.float(16|32), but bnb_4bit_compute_dtype"),
    (UserWarning, r"Adapter \S+ was active which is now deleted"),  # the host freeing one of its PEFT slots
)


def quiet_libraries() -> None:
    """Keep third-party progress bars and advisory warnings out of LQMF's output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("bitsandbytes", "peft", "accelerate", "transformers", "huggingface_hub", "datasets", "liger_kernel"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except ImportError:  # datasets is only needed for training
        pass


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: str
    dtype: str
    quantized: bool
    notes: list[str] = field(default_factory=list)

    def runtime(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": self.dtype, "quantized_4bit": self.quantized}


def select_device(preference: str = "auto"):
    import torch

    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for, but torch sees no CUDA GPU")
    return torch.device(preference)


def visible_gpus() -> int:
    """CUDA GPUs this process can see (CUDA_VISIBLE_DEVICES applies)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def compute_dtype(device):
    import torch

    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def four_bit_support(device) -> str | None:
    """None when bitsandbytes can run 4-bit layers on device, else the reason it cannot."""
    if device.type not in ("cuda", "cpu"):
        return f"bitsandbytes 4-bit is not supported on {device.type}"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed"
    return None


def load_description(saved_quant: dict[str, Any] | None, quantize_4bit: bool, dtype) -> str:
    """How the weights load, for the loading phase line: as saved, quantized now, or in a dtype."""
    if saved_quant is not None:
        return f"saved {saved_quant['label']}, loading as saved"
    return "quantizing to 4-bit NF4" if quantize_4bit else str(dtype).replace("torch.", "")


def check_prequantized(resolved: ResolvedModel, device) -> None:
    """Fail in one line, naming what to install, when a model saved quantized cannot load here."""
    import importlib.util

    from lqmf.core.models import QUANT_LOADERS

    quant = resolved.quantization
    if quant is None:
        return
    if quant["method"] not in QUANT_LOADERS:
        raise RuntimeFailure(f"'{resolved.reference}' is saved {quant['label']}, a format LQMF does not load "
                             f"(it loads {', '.join(QUANT_LOADERS)})")
    module, package = QUANT_LOADERS[quant["method"]]
    if importlib.util.find_spec(module) is None:
        raise RuntimeFailure(f"'{resolved.reference}' is saved {quant['label']}; loading it needs {package}: "
                             f"pip install {package}")
    reason = four_bit_support(device) if quant["method"] == "bitsandbytes" else None
    if reason:
        raise RuntimeFailure(f"'{resolved.reference}' is saved {quant['label']}, but {reason}")


def load_tokenizer(resolved: ResolvedModel, chat_template: str | None = None):
    from transformers import AutoTokenizer

    phase(f"loading tokenizer of {resolved.reference}")
    require_downloadable(resolved)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.load_id)
    except OSError as err:
        where = f" ({resolved.load_id})" if str(resolved.load_id) != resolved.reference else ""
        hint = ("; it is neither a local folder nor in the Hugging Face cache, and counting tokens needs it "
                f"(offline, `lqmf plan {resolved.reference}` estimates memory from the catalogue's shape)"
                if resolved.kind == "hub" else "")
        raise RuntimeFailure(f"cannot load the tokenizer of '{resolved.reference}'{where}: "
                             f"{first_line(err)}{hint}") from None
    template = chat_template or resolved.chat_template
    if template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    return tokenizer


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def first_nonfinite(tensors: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor holding NaN or an infinity, or None (one check per
    tensor, when weights are loaded: never per step)."""
    import torch

    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def checkpoint_dtype(resolved: ResolvedModel) -> str:
    """The dtype the model's weights are stored in (config.json), float32 when it does not say."""
    value = resolved.config.get("dtype") or resolved.config.get("torch_dtype")
    return value if value in ("float32", "float16", "bfloat16") else "float32"


# transformers >= 5.25 replaces layers with kernels fetched from the Hugging Face hub at load time
# (`use_kernels`, the `kernels` package) unless told otherwise. Off: a model must load offline (with
# HF_HUB_OFFLINE it failed: "kernels-community/rotary is not available in the local cache"), and
# its speed must not depend on what the hub serves that day; our decoders carry their own kernels.
HUB_KERNELS = False


def load_model(resolved: ResolvedModel, *, task: str, device_preference: str = "auto",
               quantize_4bit: bool = False, labels: list[str] | None = None,
               training: bool = False, dtype_name: str | None = None, tokenizer=None,
               quant_storage: str = "uint8") -> LoadedModel:
    """Load a base model for task (causal LM, or sequence classification with labels).

    The weights load in the device's compute dtype unless dtype_name (e.g. "bfloat16") says otherwise.
    A tokenizer the caller already loaded for this model is used as it is. quant_storage is the
    dtype 4-bit weights are packed in (FSDP needs the compute dtype).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    quiet_libraries()
    device = select_device(device_preference)
    dtype = getattr(torch, dtype_name) if dtype_name else compute_dtype(device)
    notes: list[str] = []
    saved_quant = resolved.quantization
    if saved_quant is not None:  # weights saved quantized load as saved, whatever was asked
        check_prequantized(resolved, device)
        if not quantize_4bit and saved_quant["bits"] == 4:
            notes.append(f"'{resolved.reference}' is saved {saved_quant['label']}: loading it 4-bit as saved")
        quantize_4bit = saved_quant["bits"] == 4
    elif quantize_4bit:
        reason = four_bit_support(device)
        if reason:
            notes.append(f"4-bit quantization off: {reason}")
            quantize_4bit = False
    if tokenizer is None:
        tokenizer = load_tokenizer(resolved)
    how = load_description(saved_quant, quantize_4bit, dtype)
    phase(f"loading base model {resolved.reference} on {device.type} ({how})")
    kwargs: dict[str, Any] = {"dtype": dtype, "use_kernels": HUB_KERNELS}
    if saved_quant is not None:
        kwargs["device_map"] = {"": str(device) if device.type != "cuda" else torch.cuda.current_device()}
    elif quantize_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=[*CLASSIFIER_HEADS, "lm_head"],
            bnb_4bit_quant_storage=getattr(torch, quant_storage),
        )
        kwargs["device_map"] = {"": str(device) if device.type != "cuda" else torch.cuda.current_device()}
    try:
        if task == "classification":
            if not labels:
                raise InputError("a classification model needs its label names")
            model = AutoModelForSequenceClassification.from_pretrained(
                resolved.load_id, num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)}, **kwargs,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(resolved.load_id, **kwargs)
    except (OSError, ValueError) as err:
        raise RuntimeFailure(f"cannot load model '{resolved.reference}': {first_line(err)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if "device_map" not in kwargs:
        model.to(device)
    if not training:
        model.eval()
    return LoadedModel(model, tokenizer, device.type, str(dtype).replace("torch.", ""), quantize_4bit, notes)
