"""Our LoRA layer classes (`LeanLinear`, `LeanLinear4bit`): PEFT's `lora.Linear` and
`lora.bnb.Linear4bit` with `LeanForward` mixed in, which PEFT builds when a LoraConfig went through
`build_lean_layers` (PEFT's custom-module API, compat.py). They behave as PEFT's own until
`use_lean_lora` turns the lean forward on; then they train (same loss and gradients as PEFT's,
tests/gpu) and decode one request at a time (decode/static.py).

`lean_lora_forward`'s small GEMMs overlap the 4-bit base layer on a side stream and its adds mostly
ride in the base GEMV's bias, instead of PEFT's clone, casts, two GEMMs, scale and add in line: at
batch 1 each kernel costs microseconds whatever its arithmetic (benchmarks/lora_decode_bench.py).
Layers sharing an input (q/k/v, gate/up) run one product for the group: for inference their
adapters' A's are stacked and B's made block-diagonal (`_fuse_group`). A captured CUDA graph bakes
in the active adapters and their scaling: `adapter_key` says which.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any

from lqmf.engine.compat import build_lora_layers_as, repoint, tensor_version
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
    side_stream: Any = None  # CUDA stream for the LoRA products while a graph is captured
    followers: list = field(default_factory=list)  # shared-input siblings this layer computes for
    fused: dict = field(default_factory=dict)  # adapter -> (stacked A, block-diagonal B, spans)
    pending: tuple | None = None  # (input, its version, adapters, output) left by the group's leader
    forked: bool = False  # this step used the side stream


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
    Inference: the first layer of a shared-input group (q_proj of q/k/v) computes the whole group,
    and its siblings return those outputs when called with the same tensor, unchanged, as
    transformers does. Captured into a CUDA graph, the LoRA products run on a side stream while the
    layer's own 4-bit base product runs; then the siblings' base products take theirs as the GEMV's
    bias (`_base_plus`) and one add finishes the layer's own. Eagerly (a prompt, where the host sets
    the pace) the products come first and every layer takes its as bias where it can.
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
        result = layer.base_layer(x)
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
    side = state.side_stream if x.is_cuda and torch.cuda.is_current_stream_capturing() else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(x.device))
        x.record_stream(side)
        state.forked = True
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        products = _group_products(layer, rows, active)
        ready = side.record_event() if side is not None else None
    deltas = products.pop(layer)[1]
    if ready is None:
        result = _base_plus(layer, x, rows, deltas)
    else:  # the base product runs while the side stream computes the LoRA products
        result = layer.base_layer(x)
        main = torch.cuda.current_stream(x.device)
        main.wait_event(ready)
        for delta in [delta for _, theirs in products.values() for delta in theirs] + deltas:
            delta.record_stream(main)
    for follower, (names, theirs) in products.items():
        follower.lean.pending = (x, tensor_version(x), names, _base_plus(follower, x, rows, theirs))
    if ready is not None:
        flat = result.view(-1, result.shape[-1])
        for delta in deltas:
            flat.add_(delta)
    return result


def _low_rank(layer, name: str, x):
    """dropout(x) A^T for training. With dropout, under checkpoint: backward recomputes the dropout
    (the same mask: checkpoint restores the random state) and the rank-r product from x, which the
    sibling layers of a shared input keep once, instead of each layer keeping its own dropout output
    and mask (3 x 4096 x 3 bytes a token for q/k/v on a 7B model)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    dropout, down = layer.lora_dropout[name], layer.lora_A[name]
    if not isinstance(dropout, torch.nn.Dropout) or not dropout.training or dropout.p == 0:
        return down(dropout(x))
    return checkpoint(lambda inputs: down(dropout(inputs)), x, use_reentrant=False)


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
    """{layer: (its active adapters, their scaled LoRA products)} for leader and the followers it can serve.

    Where the group's adapters are fused (`_fuse_group`) and scaled alike, one product through the
    stacked A and block-diagonal B gives every member's at once.
    """
    members = {leader: active}
    for follower in leader.lean.followers:
        names = None if follower.disable_adapters or follower.merged else _lean_active(follower, rows)
        if names is not None:
            members[follower] = names
    fused = leader.lean.fused
    if (active and all(names == active for names in members.values()) and all(name in fused for name in active)
            and all(len({member.scaling[name] for member in members}) == 1 for name in active)):
        products: dict = {member: [] for member in members}
        for name in active:
            stacked_a, block_b, spans = fused[name]
            whole = scaled_product(rows, stacked_a, block_b, leader.scaling[name])
            for member, start, stop in spans:
                if member in products:
                    products[member].append(whole[:, start:stop])
        return {member: (members[member], products[member]) for member in members}
    return {member: (names, [scaled_product(rows, member.lora_A[name].weight, member.lora_B[name].weight,
                                             member.scaling[name]) for name in names])
            for member, names in members.items()}


def _fuse_group(members: list) -> None:
    """Keep each adapter's A matrices of a shared-input group stacked in one tensor and its B matrices
    as the blocks of one block-diagonal tensor; the layers' weights become views into them, so an
    in-place copy into a layer's weights updates the fused tensors too."""
    import torch

    leader = members[0]
    fused = leader.lean.fused
    for name in list(fused):
        if any(name not in member.lora_A for member in members):
            del fused[name]
    for name in leader.lora_A:
        if name in fused or any(name not in member.lora_A for member in members):
            continue
        a_list = [member.lora_A[name].weight for member in members]
        b_list = [member.lora_B[name].weight for member in members]
        if len({a.shape for a in a_list}) != 1 or len({t.dtype for t in a_list + b_list}) != 1:
            continue
        rank = a_list[0].shape[0]
        stacked_a = torch.cat([a.detach() for a in a_list])
        block_b = torch.zeros(sum(b.shape[0] for b in b_list), rank * len(members), dtype=b_list[0].dtype,
                              device=b_list[0].device)
        spans, start = [], 0
        for index, (member, b) in enumerate(zip(members, b_list, strict=True)):
            columns = slice(index * rank, (index + 1) * rank)
            block_b[start:start + b.shape[0], columns] = b.detach()
            repoint(member.lora_A[name].weight, stacked_a[columns])
            repoint(member.lora_B[name].weight, block_b[start:start + b.shape[0], columns])
            spans.append((member, start, start + b.shape[0]))
            start += b.shape[0]
        fused[name] = (stacked_a, block_b, spans)


def forget_fused(model, name: str) -> None:
    """Drop adapter name's fused tensors (its weights were replaced other than in place)."""
    for layer in lora_layers(model):
        if isinstance(layer, LeanForward):
            layer.lean.fused.pop(name, None)


def join_side_streams(layers: list) -> None:
    """Make the current stream wait for lean LoRA layers' side streams; drop products no sibling used."""
    import torch

    sides = set()
    for layer in layers:
        state = layer.lean
        state.pending = None
        if state.forked:  # only streams this step used: others are not in a graph capture
            state.forked = False
            sides.add(state.side_stream)
    for side in sides:
        torch.cuda.current_stream(side.device).wait_stream(side)


def use_lean_lora(model, dtype=None) -> list:
    """Turn on the lean forward of model's LoRA layers of our classes (idempotent; PEFT's own layers,
    built without `build_lean_layers`, stay as they are); for inference (dtype given) also put their
    adapters' weights in dtype, fused per shared-input group. Returns those layers."""
    import torch

    side = None
    layers = [layer for layer in lora_layers(model) if isinstance(layer, LeanForward)]
    for layer in layers:
        if not layer.lean.enabled:
            layer.lean.enabled = True
            weight = next(layer.base_layer.parameters(), None)
            if weight is not None and weight.is_cuda:
                side = side or torch.cuda.Stream(weight.device)
                layer.lean.side_stream = side
        for modules in (layer.lora_A, layer.lora_B) if dtype is not None else ():
            for module in modules.values():
                if module.weight.dtype != dtype:
                    module.to(dtype)
    for parent in model.modules():
        for group in SHARED_INPUT_GROUPS:
            members = [getattr(parent, name, None) for name in group]
            members = [m for m in members if uses_lean_forward(m)]
            if len(members) > 1:
                members[0].lean.followers = members[1:]
                if dtype is not None:  # inference only: training keeps PEFT's own tensors
                    _fuse_group(members)
    return layers


def adapter_key(layers: list) -> tuple:
    """What a captured graph bakes in of a model's LoRA layers: the active adapters and every scaling."""
    if not layers or layers[0].disable_adapters:
        return ()
    active = tuple(layers[0].active_adapters)
    return active, tuple(layer.scaling.get(name) for layer in layers for name in active)
