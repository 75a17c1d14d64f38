"""Our LoRA layer classes for training (`LeanLinear`, `LeanLinear4bit`): PEFT's `lora.Linear` and
`lora.bnb.Linear4bit` with `LeanForward` mixed in, which PEFT builds when a LoraConfig went through
`build_lean_layers` (PEFT's custom-module API, compat.py). They behave as PEFT's own until
`use_lean_lora` turns the lean forward on; then they train with the same loss and gradients as
PEFT's (tests/gpu), in fewer kernels: one GEMM into the rank space and one that adds the scaled
product to the base output, instead of PEFT's clone, casts, two GEMMs, scale and add.

Without gradients (validation, KTO's reference pass) layers sharing an input (q/k/v, gate/up) run
one product call for the group and a plain linear's product rides in its GEMM as the bias. Decoding
does not use these layers: it applies LoRA with stacked.py's `BatchedLoRALinear` over the base layers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from lqmf.engine.compat import build_lora_layers_as, tensor_version
from lqmf.engine.fused.checkpointing import checkpoint
from lqmf.engine.lora import dropout as fused_dropout
from lqmf.engine.lora import nf4_frozen
from lqmf.engine.lora.kernels import scaled_product

# ----------------------------------------------------------------------------- lean LoRA layers


def lora_layers(model) -> list:
    """model's PEFT LoRA layers, in module order."""
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


@dataclass
class LeanState:
    """What the lean forward keeps for one LoRA layer."""

    enabled: bool = False  # off: the layer is PEFT's
    followers: list = field(default_factory=list)  # shared-input siblings this layer computes for
    pending: tuple | None = None  # (input, its version, adapters, output) left by the group's leader
    recompute_dropout: bool = True  # training: the dropout is recomputed in backward instead of kept (_low_rank)
    fused_dropout: bool = False  # training: dropout(x) A^T in dropout.py's kernels, the mask never stored


class LeanForward:
    """Mixed into PEFT's LoRA layer classes (`lean_layer_classes`): `lean_lora_forward` once
    `use_lean_lora` enabled it, PEFT's forward until then and for what it does not handle."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lean = LeanState()

    def forward(self, x, *args, **kwargs):
        if self.lean.enabled:
            return lean_lora_forward(self, x, *args, **kwargs)
        return super().forward(x, *args, **kwargs)

    def peft_forward(self, x, *args, **kwargs):
        return super().forward(x, *args, **kwargs)


class _ExactType(type):
    """isinstance(obj, C) is True only for objects of exactly C.types (not their subclasses): PEFT
    matches a base layer type by isinstance, and 8-bit or other quantized linears subclass nn.Linear."""

    def __instancecheck__(cls, obj) -> bool:
        return type(obj) in cls.types


@functools.cache
def lean_layer_classes() -> dict:
    """{base layer type: our LoRA layer class}: plain nn.Linear and bitsandbytes 4-bit linears."""
    import torch
    from peft.tuners.lora import Linear

    class LeanLinear(LeanForward, Linear):
        """PEFT's LoRA Linear with the lean forward."""

    class PlainLinear(metaclass=_ExactType):
        types = (torch.nn.Linear,)

    classes: dict = {PlainLinear: LeanLinear}
    try:
        import bitsandbytes as bnb
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return classes

    class LeanLinear4bit(LeanForward, Linear4bit):
        """PEFT's LoRA Linear4bit (a bitsandbytes 4-bit base) with the lean forward."""

    class Plain4bit(metaclass=_ExactType):
        types = (bnb.nn.Linear4bit,)

    return {Plain4bit: LeanLinear4bit, **classes}


def build_lean_layers(config) -> None:
    """Make PEFT build the LoRA layers of config (a LoraConfig) as `lean_layer_classes`."""
    build_lora_layers_as(config, lean_layer_classes())


def uses_lean_forward(layer) -> bool:
    return isinstance(layer, LeanForward) and layer.lean.enabled


def lean_state(layer) -> LeanState:
    """The lean forward's state of a layer that `use_lean_lora` prepared."""
    return layer.lean


# LoRA layers that transformers calls one after another on the same input tensor.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


def lean_lora_forward(layer, x, *args, **kwargs):
    """A LoRA layer's forward: base output plus dropout(x) A^T B^T * scaling, with fewer kernels than PEFT's.

    Training: one GEMM into the rank-r space and one GEMM that adds the scaled product to the base
    output (PEFT also clones the output and scales and adds in separate passes over it).
    Without gradients: the first layer of a shared-input group (q_proj of q/k/v) computes the whole
    group, and its siblings return those outputs when called with the same tensor, unchanged, as
    transformers does; every layer takes its product as its base product's bias where it can.
    """
    import torch

    state = layer.lean
    if args or kwargs or layer.merged:
        return layer.peft_forward(x, *args, **kwargs)
    if layer.disable_adapters:
        return layer.base_layer(x)
    active = _lean_active(layer, x, training=torch.is_grad_enabled())
    if active is None:
        return layer.peft_forward(x, *args, **kwargs)
    if torch.is_grad_enabled():
        result = nf4_frozen.linear(layer.base_layer, x)
        for name in active:
            low = _low_rank(layer, name, x)
            flat = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]),
                               layer.lora_B[name].weight.t(), alpha=layer.scaling[name])
            result = flat.view(result.shape)
        return result
    pending, state.pending = state.pending, None
    if pending is not None and pending[0] is x and pending[1] == tensor_version(x) and pending[2] == active:
        return pending[3]
    rows = x.reshape(-1, x.shape[-1])
    products = _group_products(layer, rows, active)
    result = _base_plus(layer, x, rows, products.pop(layer)[1])
    for follower, (names, theirs) in products.items():
        follower.lean.pending = (x, tensor_version(x), names, _base_plus(follower, x, rows, theirs))
    return result


def _low_rank(layer, name: str, x):
    """dropout(x) A^T for training. With dropout and `recompute_dropout` (the default), under checkpoint:
    backward recomputes the dropout (the same mask: checkpoint restores the random state) and the rank-r
    product from x, which the sibling layers of a shared input keep once, instead of each layer keeping
    its own dropout output and mask (3 x 4096 x 3 bytes a token for q/k/v on a 7B model). Kept instead,
    where memory allows (`recompute_lora_dropout`), a micro-batch runs a third fewer dropouts and no
    checkpoint of their own (8 of a decoder layer's 9 checkpoint calls). Where `fuse_lora_dropout` switched the
    layer on, dropout.py's kernels draw the mask where they multiply: nothing kept, nothing recomputed."""
    import torch

    dropout, down = layer.lora_dropout[name], layer.lora_A[name]
    if layer.lean.fused_dropout and fused_dropout.applies(dropout, down, x):
        return fused_dropout.low_rank(x, down.weight, dropout.p)
    if (not layer.lean.recompute_dropout or not isinstance(dropout, torch.nn.Dropout) or not dropout.training
            or dropout.p == 0):
        return down(dropout(x))
    return checkpoint(lambda inputs: down(dropout(inputs)), x)


def _base_plus(layer, x, rows, deltas: list):
    """layer's base output for x plus its (scaled) LoRA deltas; a single delta is folded into the base
    product as its bias (a 4-bit GEMV takes one for a single row), which saves the add's kernel."""
    import torch

    base = layer.base_layer
    weight = getattr(base, "weight", None)
    if len(deltas) == 1 and getattr(base, "bias", None) is None and weight is not None:
        if type(base) is torch.nn.Linear and weight.dtype == x.dtype:
            return torch.addmm(deltas[0], rows, weight.t()).view(*x.shape[:-1], -1)
        state = getattr(weight, "quant_state", None)
        if state is not None and rows.shape[0] == 1 and x.is_cuda and x.dtype == getattr(base, "compute_dtype", None):
            import bitsandbytes as bnb

            return bnb.matmul_4bit(x, weight.t(), bias=deltas[0].view(-1), quant_state=state)
    result = base(x)
    flat = result.view(-1, result.shape[-1])
    for delta in deltas:
        flat.add_(delta)
    return result


def _lean_active(layer, x, training: bool = False) -> list[str] | None:
    """The layer's active adapters, or None when the lean forward cannot run them (PEFT's will)."""
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if any(name in layer.lora_variant or layer.lora_B[name].bias is not None
           or (not training and layer.lora_B[name].weight.dtype != x.dtype) for name in active):
        return None
    return active


def _group_products(leader, rows, active: list[str]) -> dict:
    """{layer: (its active adapters, their scaled LoRA products)} for leader and the followers it can serve."""
    members = {leader: active}
    for follower in leader.lean.followers:
        names = None if follower.disable_adapters or follower.merged else _lean_active(follower, rows)
        if names is not None:
            members[follower] = names
    return {member: (names, [scaled_product(rows, member.lora_A[name].weight, member.lora_B[name].weight,
                                             member.scaling[name]) for name in names])
            for member, names in members.items()}


def use_lean_lora(model) -> list:
    """Turn on the lean forward of model's LoRA layers of our classes (idempotent; PEFT's own layers,
    built without `build_lean_layers`, stay as they are) and link each shared-input group's members
    to its first. Returns those layers."""
    layers = [layer for layer in lora_layers(model) if isinstance(layer, LeanForward)]
    for layer in layers:
        layer.lean.enabled = True
    for parent in model.modules():
        for group in SHARED_INPUT_GROUPS:
            members = [getattr(parent, name, None) for name in group]
            members = [m for m in members if uses_lean_forward(m)]
            if len(members) > 1:
                members[0].lean.followers = members[1:]
    return layers


def fuse_lora_dropout(model) -> int:
    """Have model's lean LoRA layers with a dropout run it inside the rank-r product's Triton kernels
    (engine/lora/dropout.py) where it applies; how many layers, 0 where Triton is missing."""
    import torch

    if fused_dropout.kernel_module() is None:
        return 0
    count = 0
    for layer in lora_layers(model):
        if uses_lean_forward(layer) and any(isinstance(module, torch.nn.Dropout) and module.p > 0
                                            for module in layer.lora_dropout.values()):
            layer.lean.fused_dropout = True
            count += 1
    return count


def recompute_lora_dropout(model, recompute: bool) -> None:
    """Whether the lean LoRA layers of model recompute their dropout in backward (see `_low_rank`) or keep
    its output and mask; the same loss and gradients either way."""
    for layer in lora_layers(model):
        if isinstance(layer, LeanForward):
            layer.lean.recompute_dropout = recompute
