"""Every use of a library's private API or internals, in one place, each with a test (tests/engine/test_compat.py)
that fails loudly when an upgrade changes it. Other modules call these functions instead."""

from __future__ import annotations

import contextlib
from typing import Any


def tensor_version(tensor) -> int | None:
    """A tensor's in-place version counter (torch's `_version`; inference tensors keep none: None)."""
    return None if tensor.is_inference() else tensor._version


LLAMA_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm",
                   "LeanRMSNorm")  # the last: engine/fused/norm.py's, computing the same


def rms_norm_parameters(norm) -> tuple[Any, float] | None:
    """(weight, eps) of one of transformers' Llama-style RMSNorms, which compute
    `weight * (x.float() * rsqrt(mean(x.float() ** 2) + eps)).to(x.dtype)` with eps in the undocumented
    `variance_epsilon`; None for any other norm (the decoder's fused kernel then stays off)."""
    eps, weight = getattr(norm, "variance_epsilon", None), getattr(norm, "weight", None)
    if type(norm).__name__ not in LLAMA_RMS_NORMS or not isinstance(eps, float) or weight is None:
        return None
    return weight, eps


def foreach_copy(targets: list, sources: list) -> None:
    """Copy each source into its target in one batched call (torch's `_foreach_copy_`)."""
    import torch

    torch._foreach_copy_(targets, sources)


def share_children(wrapper, module) -> None:
    """Give wrapper module's children (torch's `Module._modules`, the same dict object): named_modules,
    state_dict and setattr (PEFT's layer injection) then see them under the wrapper, with the names
    they had under module, and a child replaced through either shows through both."""
    wrapper._modules = module._modules


def build_lora_layers_as(config, mapping: dict) -> None:
    """Have PEFT build config's LoRA layers from mapping's classes ({base layer type: LoRA layer class},
    first isinstance match wins; a base that matches none gets PEFT's own layer), through PEFT's
    experimental custom-module API (`LoraConfig._register_custom_module`, docs: custom_models).
    The mapping is not saved with the adapter: plain PEFT loads what these layers save."""
    config._register_custom_module(mapping)


def stack_4bit(modules: list) -> tuple[Any, Any] | None:
    """bitsandbytes 4-bit linears that read one input, as one: (packed weight, QuantState) of their
    weights stacked by output rows, for `bitsandbytes.matmul_4bit`; None where they cannot be stacked.

    Relies on the packed layout: a [N, K] weight is quantized row-major in blocks of `blocksize` values,
    so where N*K is a whole number of blocks, the stacked bytes and absmax are those of the stacked
    weight. The modules' weights become views into the stacked bytes (no copy stays); only the absmax,
    dequantized to float32 when nested, is new (1/16 of the packed size).
    """
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import QuantState

    if len(modules) < 2 or not all(isinstance(m, bnb.nn.Linear4bit) for m in modules):
        return None
    weights = [m.weight for m in modules]
    states = [getattr(w, "quant_state", None) for w in weights]
    if any(s is None or getattr(s, "packing_format_for_cpu", False) or len(s.shape) != 2 for s in states):
        return None
    first = states[0]
    same = {(s.blocksize, s.quant_type, s.dtype, s.shape[1], w.dtype, w.device)
            for s, w in zip(states, weights, strict=True)}
    if (len(same) != 1 or any(m.bias is not None for m in modules)
            or any(s.shape[0] * s.shape[1] % s.blocksize for s in states)
            or not all(w.is_contiguous() for w in weights)):
        return None

    packed = torch.cat([w.data for w in weights])
    start = 0
    for weight in weights:
        weight.data = packed[start:start + weight.shape[0]]
        start += weight.shape[0]
    rows = sum(s.shape[0] for s in states)
    state = QuantState(absmax=torch.cat([absmax_fp32(s) for s in states]), shape=torch.Size([rows, first.shape[1]]),
                       code=first.code, blocksize=first.blocksize, quant_type=first.quant_type, dtype=first.dtype)
    return packed, state


def absmax_fp32(state):
    """A bitsandbytes QuantState's per-block absmax as float32, its second quantization level (`nested`:
    uint8 codes, `state2`, `offset`) undone as bitsandbytes' dequantize_4bit undoes it."""
    from bitsandbytes.functional import dequantize_blockwise

    if not state.nested:
        return state.absmax.float()
    return (dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def nf4_parts(module) -> tuple[Any, Any, Any, tuple[int, int], int] | None:
    """A bitsandbytes Linear4bit's NF4 weight as engine/lora/nf4.py reads it: (packed bytes [N*K/2] uint8,
    absmax float32 [N*K/blocksize] (dequantized once where nested), code float32 [16], (N, K), blocksize);
    None for any other layer, or one bitsandbytes repacked for its CPU path. Relies on the packed layout:
    [N, K] row-major, two codes a byte (even k in the high nibble), blocks of blocksize consecutive values."""
    import torch

    state = _nf4_state(module)
    if state is None:
        return None
    shape = (int(state.shape[0]), int(state.shape[1]))
    return (module.weight.data.reshape(-1).view(torch.uint8), absmax_fp32(state).contiguous(),
            state.code.to(module.weight.device, torch.float32).contiguous(), shape, int(state.blocksize))


def nf4_stored_parts(module) -> dict | None:
    """A bitsandbytes Linear4bit's NF4 weight as stored, for engine/lora/nf4_frozen.py's dequantize kernel:
    packed (bytes [N*K/2] uint8), absmax (float32 [N*K/blocksize], or uint8 codes where nested), code
    (float32 [16]), shape (N, K), blocksize, and where nested the second level as bitsandbytes'
    dequantize_4bit undoes it (absmax = code2[absmax] * absmax2[block // blocksize2] + offset):
    absmax2 (float32), code2 (float32 [256]), offset (float32 [1]), blocksize2. None as for nf4_parts,
    and for a nested state that is not one absmax a blocksize2 of first-level blocks."""
    import torch

    state = _nf4_state(module)
    if state is None:
        return None
    parts = dict(packed=module.weight.data.reshape(-1).view(torch.uint8), absmax=state.absmax.contiguous(),
                 code=state.code.to(module.weight.device, torch.float32).contiguous(),
                 shape=(int(state.shape[0]), int(state.shape[1])), blocksize=int(state.blocksize), nested=state.nested)
    if state.nested:
        second = state.state2
        if second.absmax.dtype != torch.float32 or second.absmax.numel() * second.blocksize < state.absmax.numel():
            return None
        parts.update(absmax2=second.absmax.contiguous(), code2=second.code.to(torch.float32).contiguous(),
                     offset=torch.as_tensor(state.offset, dtype=torch.float32, device=state.absmax.device).reshape(1),
                     blocksize2=int(second.blocksize))
    return parts


def _nf4_state(module):
    """module's bitsandbytes QuantState where it is an NF4 Linear4bit in the layout nf4_parts reads, else None."""
    import bitsandbytes as bnb

    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if (not isinstance(module, bnb.nn.Linear4bit) or state is None or state.quant_type != "nf4"
            or getattr(state, "packing_format_for_cpu", False) or len(state.shape) != 2
            or not weight.is_contiguous()):
        return None
    return state


def repoint(parameter, tensor) -> None:
    """Make a library module's parameter (PEFT's LoRA weights, an nn.Linear's weight, a trainable
    weight upcast to float32) hold `tensor` instead, in place: assigning `Parameter.data`, which
    keeps the Parameter object (the module's attribute, `named_parameters`, an optimizer's reference)
    and only swaps what it holds. Torch documents `.data` as discouraged, not removed."""
    parameter.data = tensor


def set_lora_scaling(layer, adapter: str, value: float) -> None:
    """Set PEFT's per-adapter LoRA scale (`LoraLayer.scaling[adapter]`, alpha / r), which its forward reads
    on every call; PEFT's own `set_scale` multiplies from alpha and leaves a hot-swapped rank's out."""
    layer.scaling[adapter] = value


def hotswap_lora_adapter(model, path: str, adapter: str, device) -> None:
    """PEFT's `hotswap_adapter` of the LoRA adapter at path into adapter's tensors (another rank allowed).

    PEFT refuses configs that differ in `lora_dropout`, which only acts in training: the slot's config
    takes the new value for the swap (restored when the swap fails). Raises what PEFT raises."""
    from peft import LoraConfig
    from peft.utils.hotswap import hotswap_adapter

    config = model.peft_config[adapter]
    dropout, config.lora_dropout = config.lora_dropout, LoraConfig.from_pretrained(path).lora_dropout
    try:
        hotswap_adapter(model, path, adapter_name=adapter, torch_device=device)
    except BaseException:
        config.lora_dropout = dropout
        raise


def saved_lora_key(key: str) -> tuple[str, str] | None:
    """(module path in the base model, "A" or "B") for a key of PEFT's saved `adapter_model.safetensors`
    ("base_model.model.<module>.lora_A.weight"); None for any other weight."""
    module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
    return (module, kind[0]) if kind in ("A.weight", "B.weight") else None


def live_lora_key(saved: str, adapter: str) -> str:
    """The `named_parameters` name of a saved LoRA key once loaded as adapter
    ("...lora_A.weight" -> "...lora_A.<adapter>.weight")."""
    return saved.replace(".lora_A.weight", f".lora_A.{adapter}.weight").replace(
        ".lora_B.weight", f".lora_B.{adapter}.weight")


def keep_4bit_training_layout(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for AVX512-BF16 CPU inference (its
    `Linear4bit.support_avx512bf16_for_cpu` flag): it does so the first time a layer runs in eval mode
    and never unpacks them for training, whose backward then fails."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def no_split_module_names(model) -> set[str]:
    """Class names of the blocks a transformers model says must not be split across devices
    (`PreTrainedModel._no_split_modules`): FSDP wraps each such block as one unit."""
    return set(getattr(model, "_no_split_modules", None) or [])


def json_400_http_protocol(error_body: Any) -> type:
    """The HTTP protocol class uvicorn's `http="auto"` picks (httptools, else h11), answering a request it
    cannot parse (a Content-Length that is not a number...) with error_body(message) (bytes of JSON)
    instead of its plain-text 400. Overrides `send_400_response`, an undocumented method of both."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class JsonErrorProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def send_400_response(self, msg: str) -> None:
            body = error_body(msg)
            head = [b"HTTP/1.1 400 Bad Request\r\n"]
            head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
            head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                     b"connection: close\r\n\r\n"]
            self.transport.write(b"".join(head) + body)
            self.transport.close()

    return JsonErrorProtocol


def no_such_option_error() -> type[Exception]:
    """The exception Typer's parser raises for an unknown option (Typer vendors click as typer._click, whose
    NoSuchOption it does not export); its `possibilities` are the options offered in the message."""
    try:
        from typer._click.exceptions import NoSuchOption
    except ImportError:  # a Typer on the plain click package
        from click.exceptions import NoSuchOption
    return NoSuchOption


def typer_group_and_builders(app) -> tuple[Any, dict[str, Any]] | None:
    """app's click group, built as `typer.main.get_command` builds it (app's `cls`, help and settings) but
    holding none of app's own commands yet, and {name: a function that builds that command} for each;
    None for an app of fewer than two commands (left to `typer.main.get_command`). Lets a group of many
    subcommands build only the one invoked. Uses Typer's undocumented `Typer.registered_commands`,
    `typer.main.get_group`, `get_command_from_info` and `get_command_name`."""
    import copy
    import functools

    from typer import main

    if len(app.registered_commands) < 2:
        return None
    bare = copy.copy(app)  # the same settings; its own (empty) list of commands
    bare.registered_commands = []
    group = main.get_group(bare)
    builders = {
        info.name or main.get_command_name(info.callback.__name__): functools.partial(
            main.get_command_from_info, info, pretty_exceptions_short=app.pretty_exceptions_short,
            rich_markup_mode=app.rich_markup_mode)
        for info in app.registered_commands}
    return group, builders


def attention_implementation(model) -> str | None:
    """The attention implementation a transformers model runs (its config's `_attn_implementation`, which
    `set_attn_implementation` leaves unchanged, with a logged warning, where the class cannot switch)."""
    return getattr(model.config, "_attn_implementation", None)


# transformers' model modules whose attention calls a module-level `apply_rotary_pos_emb(q, k, cos, sin,
# unsqueeze_dim=1)` that rotates the whole head by `rotate_half` (what liger-kernel's RoPE computes)
ROTATE_HALF_MODULES = ("transformers.models.llama.modeling_llama", "transformers.models.mistral.modeling_mistral",
                       "transformers.models.qwen2.modeling_qwen2")


def rotary_attention_layers(model) -> tuple[list, int]:
    """The transformers modules (of ROTATE_HALF_MODULES) whose attention classes model's layers are, and
    how many attention layers that covers."""
    import sys

    modules: dict[str, Any] = {}
    layers = 0
    for module in model.modules():
        name = type(module).__module__
        if name in ROTATE_HALF_MODULES and type(module).__name__.endswith("Attention"):
            home = sys.modules[name]
            if callable(getattr(home, "apply_rotary_pos_emb", None)):
                modules[name] = home
                layers += 1
    return list(modules.values()), layers


@contextlib.contextmanager
def rotary_embedding_as(model, function):
    """Within the block, model's attention layers (`rotary_attention_layers`) rotate q and k with function
    in place of their module's `apply_rotary_pos_emb`, which their forward looks up by that global
    name; every other model of those classes in the process does too, until the block ends."""
    homes, _ = rotary_attention_layers(model)
    saved = [(home, home.apply_rotary_pos_emb) for home in homes]
    try:
        for home, _ in saved:
            home.apply_rotary_pos_emb = function
        yield
    finally:
        for home, original in saved:
            home.apply_rotary_pos_emb = original


def checkpointed_layers(model) -> list:
    """model's decoder layers that transformers checkpoints one by one (`GradientCheckpointingLayer`s), in
    order: with `gradient_checkpointing_enable` each runs under a checkpoint where its instance flag
    `gradient_checkpointing` is set, which `set_layer_checkpointing` turns off for one layer."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def set_layer_checkpointing(layer, on: bool) -> None:
    """Checkpoint one of `checkpointed_layers` (recompute it in backward) or not (it keeps what it saves)."""
    layer.gradient_checkpointing = on
