"""Tensor names and shapes of safetensors checkpoints, read from their headers (no torch).

A safetensors file starts with an 8-byte little-endian header length and a JSON header that maps
each tensor name to its dtype, shape and byte range, so module names and shapes can be read
without loading any weights.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from lqmf.core.errors import InputError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024

TensorInfo = tuple[str, tuple[int, ...]]  # (dtype, shape)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """{tensor name: (dtype, shape)} of one .safetensors file."""
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise InputError(f"{path}: not a safetensors file (shorter than its header)")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise InputError(f"{path}: not a safetensors file (header of {length} bytes)")
            header = json.loads(handle.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read the safetensors header ({type(err).__name__})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: the safetensors header is not a JSON object")
    return {name: (info.get("dtype", "?"), tuple(info.get("shape", ())))
            for name, info in header.items() if name != "__metadata__" and isinstance(info, dict)}


def read_safetensors_checked(path: Path) -> tuple[dict[str, TensorInfo], str | None]:
    """The tensors of a safetensors file and why it is not complete (header unreadable, data cut short
    or padded), or None: one open and one header read."""
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
            if length is None or length > MAX_HEADER_BYTES:
                return {}, f"{path.name} is not a safetensors file (no valid header length)"
            header = json.loads(handle.read(length))
            data_bytes = os.fstat(handle.fileno()).st_size - 8 - length
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return {}, f"{path.name} is not a safetensors file (unreadable header: {type(err).__name__})"
    if not isinstance(header, dict):
        return {}, f"{path.name} is not a safetensors file (its header is not a JSON object)"
    tensors = {}
    end = 0
    try:
        for name, info in header.items():
            if name != "__metadata__":
                tensors[name] = (info.get("dtype", "?"), tuple(info["shape"]))
                end = max(end, int(info["data_offsets"][1]))
    except (TypeError, KeyError, IndexError, ValueError, AttributeError):
        return {}, f"{path.name} is not a safetensors file (a tensor without shape or data offsets)"
    if end != data_bytes:
        return {}, f"{path.name} holds {data_bytes} bytes of tensor data, its header describes {end}"
    return tensors, None


def checkpoint_tensors(folder: Path) -> dict[str, TensorInfo] | None:
    """Every tensor of the model checkpoint in folder (single file or sharded), or None without safetensors."""
    single = folder / SINGLE_FILE
    if single.is_file():
        return read_safetensors_header(single)
    index = folder / INDEX_FILE
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        raise InputError(f"{index}: not a valid safetensors index (no 'weight_map')") from None
    tensors: dict[str, TensorInfo] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = folder / shard
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise InputError(f"{index}: shard '{shard}' lies outside the model folder")
        if not shard_path.is_file():
            raise InputError(f"{index}: shard '{shard}' is missing")
        tensors.update(read_safetensors_header(shard_path))
    return tensors


# ----------------------------------------------------------------------------- LoRA vs base

LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
EXAMPLES_SHOWN = 3


def module_weights(tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """{module path: (dtype, shape) of its .weight} for every module that has a weight."""
    return {name[: -len(".weight")]: info for name, info in tensors.items() if name.endswith(".weight")}


def find_module(path: str, modules: dict[str, TensorInfo]) -> str | None:
    """The base module that an adapter's module path names, allowing for a different prefix.

    A PEFT adapter on a task model names `bert.encoder.layer.0...` where the base checkpoint may
    hold `encoder.layer.0...` (or the other way round).
    """
    parts = path.split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        if candidate in modules:
            return candidate
    suffix = "." + path
    return next((name for name in modules if name.endswith(suffix)), None)


def _examples(items: list[str]) -> str:
    shown = ", ".join(items[:EXAMPLES_SHOWN])
    return shown + (f" and {len(items) - EXAMPLES_SHOWN} more" if len(items) > EXAMPLES_SHOWN else "")


MAX_PATTERN_CHARS = 500
MAX_UNBOUNDED_REPEATS = 2
_UNBOUNDED = re.compile(r"[*+]|\{\d*,\d*\}")


def target_pattern_problem(pattern: str) -> str | None:
    """Why a target_modules regex must not be matched against module names, or None.

    Python's regex engine backtracks without a time limit, so an adapter's own config could hang
    whoever matches its pattern (catastrophic backtracking). A pattern is matched only when it is
    short, compiles, repeats no group (`(a+)+`, `(a|a)*`), refers to no group and has at most
    MAX_UNBOUNDED_REPEATS unbounded repeats (`.*`): then matching a module name is polynomial in
    its few dozen characters. PEFT's own patterns (`.*\\.(q_proj|v_proj)`) pass.
    """
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"target_modules pattern is longer than {MAX_PATTERN_CHARS} characters"
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        return f"target_modules pattern {pattern!r} is not a valid regular expression ({err})"
    plain = _without_classes_and_escapes(pattern)
    if plain is None:
        return f"target_modules pattern {pattern!r} refers back to a group: not matched, it could take unbounded time"
    if re.search(r"\)(?:[*+]|\{)", plain):
        return f"target_modules pattern {pattern!r} repeats a group: not matched, it could take unbounded time"
    if len(_UNBOUNDED.findall(plain)) > MAX_UNBOUNDED_REPEATS:
        return (f"target_modules pattern {pattern!r} has more than {MAX_UNBOUNDED_REPEATS} unbounded repeats: "
                "not matched, it could take unbounded time")
    return None


def _without_classes_and_escapes(pattern: str) -> str | None:
    """pattern with each escape and [...] class replaced by 'x' (None where it has a backreference)."""
    out, index = [], 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            following = pattern[index + 1:index + 2]
            if following.isdigit() and following != "0" or pattern.startswith("(?P=", index + 1):
                return None
            out.append("x")
            index += 2
        elif char == "[":
            end = index + 1 + (pattern[index + 1:index + 2] == "^")
            end += pattern[end:end + 1] == "]"  # a leading ] is a member
            while end < len(pattern) and pattern[end] != "]":
                end += 2 if pattern[end] == "\\" else 1
            out.append("x")
            index = end + 1
        else:
            if pattern.startswith("(?P=", index):
                return None
            out.append(char)
            index += 1
    return "".join(out)


def check_target_modules(targets: Any, modules: dict[str, TensorInfo]) -> list[str]:
    """Problems with adapter_config.json's target_modules against the base model's module names."""
    if targets is None:
        return []
    if isinstance(targets, str):
        if targets == "all-linear":
            return [] if any(len(shape) == 2 for _, shape in modules.values()) else \
                ["target_modules is 'all-linear' but the base model has no linear layers"]
        problem = target_pattern_problem(targets)
        if problem is not None:
            return [problem]
        pattern = re.compile(targets)
        names = [".".join(name.split(".")[i:]) for name in modules for i in range(name.count(".") + 1)]
        return [] if any(pattern.fullmatch(n) for n in names) else \
            [f"target_modules pattern '{targets}' matches no module of the base model"]
    missing = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
    return [f"target module{'s' if len(missing) > 1 else ''} {_examples(missing)} not in the base model"] \
        if missing else []


def check_lora_weights(adapter_tensors: dict[str, TensorInfo], modules: dict[str, TensorInfo],
                       fan_in_fan_out: bool = False) -> list[str]:
    """Problems with the adapter's LoRA matrices: modules the base lacks, shapes that do not fit."""
    unknown: list[str] = []
    mismatched: list[str] = []
    for key, (_, shape) in sorted(adapter_tensors.items()):
        match = LORA_KEY.match(key)
        if not match or len(shape) != 2:
            continue
        module = find_module(match["module"], modules)
        if module is None:
            if match["which"] == "A":
                unknown.append(match["module"])
            continue
        dtype, base_shape = modules[module]
        if dtype not in FLOAT_DTYPES or len(base_shape) != 2:
            continue  # pre-quantized or unusual layers: their stored shape is not the layer's shape
        out_features, in_features = base_shape[::-1] if fan_in_fan_out else base_shape
        if match["which"] == "A" and shape[1] != in_features:
            mismatched.append(f"{module} (adapter in={shape[1]}, base in={in_features})")
        if match["which"] == "B" and shape[0] != out_features:
            mismatched.append(f"{module} (adapter out={shape[0]}, base out={out_features})")
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} adapted module{'s' if len(unknown) > 1 else ''} not in the base model: "
                        f"{_examples(unknown)}")
    if mismatched:
        problems.append(f"{len(mismatched)} LoRA shape{'s' if len(mismatched) > 1 else ''} do not fit the base "
                        f"model: {_examples(mismatched)}")
    return problems
