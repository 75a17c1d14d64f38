"""Each library internal that engine/compat.py touches, checked as the code uses it: an upgrade that
changes one fails here, by name, instead of deep inside a model."""

from __future__ import annotations

import pytest
import torch

from lqmf.engine import compat


def test_tensor_version_counts_in_place_changes():
    tensor = torch.zeros(3)
    before = compat.tensor_version(tensor)
    tensor.add_(1)
    assert isinstance(before, int) and compat.tensor_version(tensor) == before + 1
    with torch.inference_mode():
        assert compat.tensor_version(torch.zeros(3)) is None


def test_foreach_copy_copies_every_pair_in_place():
    targets = [torch.zeros(2), torch.zeros(3, 2)[:, 0]]  # a strided view too
    sources = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0])]
    addresses = [t.data_ptr() for t in targets]
    compat.foreach_copy(targets, sources)
    assert all(torch.equal(t, s) for t, s in zip(targets, sources, strict=True))
    assert [t.data_ptr() for t in targets] == addresses


def test_build_lora_layers_as_gives_our_classes_and_plain_peft_loads_what_they_save(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora import Linear

    class Mine(Linear):
        pass

    class Exactly(type):
        def __instancecheck__(cls, obj):
            return type(obj) is torch.nn.Linear

    class PlainLinear(metaclass=Exactly):
        pass

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.plain = torch.nn.Linear(4, 4)
            self.sub = type("LinearKind", (torch.nn.Linear,), {})(4, 4)  # a subclass: PEFT's own layer

        def forward(self, x):
            return self.sub(self.plain(x))

    config = LoraConfig(r=2, target_modules=["plain", "sub"], init_lora_weights=False)
    compat.build_lora_layers_as(config, {PlainLinear: Mine})
    model = get_peft_model(Net(), config)
    assert type(model.base_model.model.plain) is Mine and type(model.base_model.model.sub) is Linear
    x = torch.randn(2, 4)
    expected = model(x)
    model.save_pretrained(tmp_path)
    assert "custom" not in (tmp_path / "adapter_config.json").read_text()
    plain = PeftModel.from_pretrained(Net(), tmp_path)
    plain.load_state_dict(model.state_dict())
    assert type(plain.base_model.model.plain) is Linear
    torch.testing.assert_close(plain(x), expected)


def test_only_named_library_notices_are_silenced():
    import warnings

    from lqmf.engine.loading import quiet_libraries

    quiet_libraries()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_libraries()  # the named filters go first again, inside this block
        warnings.warn("`gradient_checkpointing_enable` is deprecated and will be removed in v6.", FutureWarning,
                      stacklevel=1)
        warnings.warn("something the user should see", UserWarning, stacklevel=1)
        warnings.warn("a deprecation the user should see", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something the user should see", "a deprecation the user should see"]


def test_stack_4bit_runs_layers_as_one_and_keeps_their_weights_as_views():
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    torch.manual_seed(0)
    layers = [bnb.nn.Linear4bit(128, rows, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
              for rows in (128, 64, 64)]  # moving them quantizes them (double-quantized absmax: nested)
    assert all(layer.weight.quant_state.nested for layer in layers)
    dense = torch.cat([dequantize_4bit(layer.weight.data, layer.weight.quant_state) for layer in layers])
    packed, state = compat.stack_4bit(layers)
    x = torch.randn(3, 128)
    torch.testing.assert_close(bnb.matmul_4bit(x, packed.t(), quant_state=state), x @ dense.t())
    starts = [layer.weight.data_ptr() - packed.data_ptr() for layer in layers]
    assert starts == [0, 128 * 128 // 2, 192 * 128 // 2] and packed.numel() == 256 * 128 // 2
    torch.testing.assert_close(torch.cat([layer(x) for layer in layers], dim=-1), x @ dense.t())
    assert compat.stack_4bit(layers[:1]) is None
    other = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="fp4").to("cpu")
    assert compat.stack_4bit([layers[0], other]) is None


def _peft_linear(tmp_path=None, dropout: float = 0.0, rank: int = 2):
    """A two-layer net with LoRA (non-zero B) on both layers; saved to tmp_path when given."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(rank)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model = get_peft_model(net, LoraConfig(r=rank, lora_alpha=4, lora_dropout=dropout, target_modules=["0", "1"],
                                           init_lora_weights=False))
    if tmp_path is not None:
        model.save_pretrained(tmp_path)
    return model


def test_repoint_keeps_the_parameter_and_its_module_reads_the_new_tensor():
    layer = torch.nn.Linear(4, 2)
    parameter = layer.weight
    stacked = torch.randn(6, 4)
    compat.repoint(layer.weight, stacked[2:4])
    assert layer.weight is parameter and dict(layer.named_parameters())["weight"] is parameter
    assert parameter.data_ptr() == stacked[2:4].data_ptr() and isinstance(parameter, torch.nn.Parameter)
    x = torch.randn(3, 4)
    torch.testing.assert_close(layer(x), x @ stacked[2:4].t() + layer.bias)
    compat.repoint(parameter, parameter.data.double())  # training upcasts PEFT's trainable weights in place
    assert parameter.dtype == torch.float64 and parameter.requires_grad


def test_set_lora_scaling_is_what_peft_forward_multiplies():
    model = _peft_linear().eval()
    layer = model.base_model.model[0]
    x = torch.randn(2, 4)
    base = layer.base_layer(x)
    delta = layer(x) - base
    compat.set_lora_scaling(layer, "default", layer.scaling["default"] * 3)
    torch.testing.assert_close(layer(x) - base, 3 * delta)


def test_saved_and_live_lora_keys_follow_peft_layout(tmp_path):
    from safetensors.torch import load_file

    model = _peft_linear(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(compat.saved_lora_key(key) for key in saved) == [("0", "A"), ("0", "B"), ("1", "A"), ("1", "B")]
    assert compat.saved_lora_key("base_model.model.0.bias") is None
    live = dict(model.named_parameters())
    for key, tensor in saved.items():
        assert torch.equal(live[compat.live_lora_key(key, "default")].detach(), tensor)


def test_hotswap_lora_adapter_takes_another_dropout_and_rank(tmp_path):
    """PEFT refuses a swap between configs differing in lora_dropout; through compat it swaps, and the
    swapped model computes what the new adapter loaded fresh computes."""
    from peft import PeftModel

    _peft_linear(tmp_path / "old", dropout=0.0, rank=2)
    _peft_linear(tmp_path / "new", dropout=0.1, rank=2)
    import copy

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "old"))
    from peft.utils.hotswap import hotswap_adapter

    with pytest.raises(ValueError, match="lora_dropout"):  # PEFT's refusal, which compat works around
        hotswap_adapter(copy.deepcopy(model), str(tmp_path / "new"), adapter_name="default", torch_device="cpu")
    compat.hotswap_lora_adapter(model, str(tmp_path / "new"), "default", "cpu")
    fresh = PeftModel.from_pretrained(base, str(tmp_path / "new")).eval()
    x = torch.randn(2, 4)
    torch.testing.assert_close(model.eval()(x), fresh(x))
    assert model.peft_config["default"].lora_dropout == 0.1


def test_keep_4bit_training_layout_clears_the_bitsandbytes_flag():
    import bitsandbytes as bnb

    model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32))
    assert hasattr(model[0], "support_avx512bf16_for_cpu"), "bitsandbytes renamed its AVX512-BF16 repacking flag"
    model[0].support_avx512bf16_for_cpu = True
    compat.keep_4bit_training_layout(model)
    assert model[0].support_avx512bf16_for_cpu is False


def test_no_split_module_names_name_the_decoder_block():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    names = compat.no_split_module_names(LlamaForCausalLM(config))
    assert names == {"LlamaDecoderLayer"}


def test_models_load_without_hub_kernels(tiny_model):
    """transformers 5.25 turns hub kernels on by default (fetched online): loading.HUB_KERNELS keeps them off."""
    from lqmf.core.models import (
        ModelCatalogue,
        ResolvedModel,  # noqa: F401
    )
    from lqmf.core.workspace import Workspace
    from lqmf.engine.loading import HUB_KERNELS, load_model

    loaded = load_model(ModelCatalogue(Workspace(tiny_model.parent)).resolve(str(tiny_model)), task="chat")
    assert HUB_KERNELS is False and not getattr(loaded.model, "use_kernels", False)


def test_json_400_http_protocol_answers_an_unparsable_request_with_json():
    """uvicorn answers what its HTTP parser rejects through send_400_response (undocumented); ours writes
    JSON. A uvicorn that renames it would answer plain text again, and this fails."""
    import asyncio
    import json
    import socket
    import threading
    import time

    import uvicorn

    from lqmf.engine import compat

    async def app(scope, receive, send):  # never reached: the request does not parse
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    protocol = compat.json_400_http_protocol(lambda message: json.dumps({"error": {"message": message}}).encode())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    server = uvicorn.Server(uvicorn.Config(app, http=protocol, log_level="critical", lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        with socket.create_connection(sock.getsockname(), timeout=10) as client:
            client.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}")
            answer = b""
            while chunk := client.recv(4096):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower()
        assert json.loads(body)["error"]["message"]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_no_such_option_error_is_what_typer_raises_and_offers_its_possibilities():
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()

    @app.command()
    def run(gpus: int = 0, json_output: bool = typer.Option(False, "--json")) -> None:
        pass

    result = CliRunner().invoke(app, ["--jsn"], standalone_mode=False)
    error = result.exception
    assert isinstance(error, compat.no_such_option_error())
    assert error.option_name == "--jsn" and "--json" in error.possibilities
    error.possibilities = []
    assert error.format_message() == "No such option: --jsn"


def test_typer_group_and_builders_builds_what_typer_builds_one_command_at_a_time():
    import typer
    from typer.core import TyperGroup

    class Group(TyperGroup):
        pass

    app = typer.Typer(cls=Group, help="Things.", no_args_is_help=True, rich_markup_mode=None,
                      context_settings={"help_option_names": ["-h", "--help"]})

    calls = []

    @app.command("list")
    def list_things(json_output: bool = typer.Option(False, "--json")) -> None:
        """List things."""
        calls.append(("list", json_output))

    @app.command()
    def show_one(name: str = typer.Argument(...), limit: int = 3) -> None:
        """Show a thing."""
        calls.append((name, limit))

    group, builders = compat.typer_group_and_builders(app)
    eager = typer.main.get_command(app)
    assert type(group) is Group and not group.commands
    assert list(builders) == list(eager.commands) == ["list", "show-one"]
    assert (group.help, group.no_args_is_help, group.context_settings) == (
        eager.help, eager.no_args_is_help, eager.context_settings)
    for name, build in builders.items():
        built, expected = build(), eager.commands[name]
        assert (built.name, built.help) == (name, expected.help)
        assert [(p.name, p.opts, p.default) for p in built.params] == [(p.name, p.opts, p.default)
                                                                       for p in expected.params]
    builders["list"]().main(["--json"], standalone_mode=False)
    builders["show-one"]().main(["x", "--limit", "5"], standalone_mode=False)
    assert calls == [("list", True), ("x", 5)]
    single = typer.Typer()
    single.command()(list_things)
    assert compat.typer_group_and_builders(single) is None


def test_share_children_keeps_names_and_sees_replacements():
    from lqmf.engine.compat import share_children

    inner = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    outer = torch.nn.Module()
    share_children(outer, inner)
    parent = torch.nn.Module()
    parent.block = outer
    assert list(parent.state_dict()) == ["block.0.weight", "block.0.bias"]
    replacement = torch.nn.Linear(2, 3)
    outer.add_module("0", replacement)  # as PEFT's injection does: setattr on the parent it finds
    assert inner[0] is replacement


def test_rms_norm_parameters_are_what_the_llama_style_norms_compute_with():
    """The decoder's fused RMSNorm computes weight * (x * rsqrt(mean(x^2) + eps)).to(dtype) from these."""
    import torch
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from lqmf.engine.compat import rms_norm_parameters

    x = torch.randn(3, 32).bfloat16()
    for kind in (MistralRMSNorm, Qwen3RMSNorm):
        norm = kind(32, eps=1e-3).bfloat16()
        norm.weight.data = torch.randn(32).bfloat16()
        weight, eps = rms_norm_parameters(norm)
        assert weight is norm.weight and eps == 1e-3
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        assert torch.equal(norm(x), weight * normed.to(x.dtype))
    assert rms_norm_parameters(torch.nn.LayerNorm(32)) is None
    assert rms_norm_parameters(torch.nn.RMSNorm(32, eps=1e-3)) is None  # another formula: stays torch


def test_nf4_parts_is_the_layout_the_nf4_kernel_reads():
    """bitsandbytes' NF4 layout as engine/lora/nf4.py reads it: [N, K] row-major, the even k in a byte's
    high nibble, one absmax per blocksize values of a row (nested ones dequantized by absmax_fp32)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 48, bias=False, quant_type="nf4").to("cpu")  # nested absmax
    packed, absmax, code, shape, blocksize = compat.nf4_parts(layer)
    assert layer.weight.quant_state.nested and shape == (48, 128) and blocksize == 64
    assert packed.dtype == torch.uint8 and packed.shape == (48 * 64,) and absmax.dtype == torch.float32
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).view(48, 128).long()
    dense = code[codes] * absmax.view(48, 2).repeat_interleave(64, dim=1)
    torch.testing.assert_close(dense, dequantize_4bit(layer.weight.data, layer.weight.quant_state), rtol=0, atol=0)
    assert compat.nf4_parts(bnb.nn.Linear4bit(128, 32, quant_type="fp4").to("cpu")) is None
    assert compat.nf4_parts(torch.nn.Linear(4, 4)) is None


def test_nf4_stored_parts_are_the_weight_as_bitsandbytes_stores_it():
    """bitsandbytes' nested absmax as nf4_stored_parts hands it to the dequantize kernel: code2[absmax] *
    absmax2[block // blocksize2] + offset is each block's scale, as dequantize_4bit undoes it."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 48, bias=False, quant_type="nf4").to("cpu")  # nested absmax
    parts = compat.nf4_stored_parts(layer)
    assert parts["nested"] and parts["absmax"].dtype == torch.uint8 and parts["blocksize2"] == 256
    assert parts["packed"].data_ptr() == layer.weight.data_ptr() and parts["shape"] == (48, 128)
    blocks = torch.arange(parts["absmax"].numel())
    scale = parts["code2"][parts["absmax"].long()] * parts["absmax2"][blocks // 256] + parts["offset"]
    codes = torch.stack([parts["packed"] >> 4, parts["packed"] & 15], dim=-1).view(48, 128).long()
    dense = parts["code"][codes] * scale.view(48, 2).repeat_interleave(64, dim=1)
    torch.testing.assert_close(dense, dequantize_4bit(layer.weight.data, layer.weight.quant_state), rtol=0, atol=0)
    flat = bnb.nn.Linear4bit(128, 48, bias=False, quant_type="nf4", compress_statistics=False).to("cpu")
    flat_parts = compat.nf4_stored_parts(flat)
    assert not flat_parts["nested"] and flat_parts["absmax"].dtype == torch.float32
    assert compat.nf4_stored_parts(torch.nn.Linear(4, 4)) is None


def test_attention_implementation_is_what_the_model_runs_and_follows_a_switch():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16))
    assert compat.attention_implementation(model) == "sdpa"
    model.set_attn_implementation("eager")
    assert compat.attention_implementation(model) == "eager"


def test_rotary_embedding_as_swaps_what_the_attention_calls_and_puts_it_back():
    from transformers.models.llama import modeling_llama

    from lqmf.engine.compat import rotary_attention_layers, rotary_embedding_as
    from tests.helpers import lora_model

    model = lora_model().eval()  # no dropout: the two passes compare
    original = modeling_llama.apply_rotary_pos_emb
    assert rotary_attention_layers(model) == ([modeling_llama], 3)
    calls = []

    def counted(q, k, cos, sin, *args, **kwargs):
        calls.append(q.shape)
        return original(q, k, cos, sin, *args, **kwargs)

    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with rotary_embedding_as(model, counted):
            got = model(input_ids=ids).logits
        assert len(calls) == 3 and calls[0] == (2, 4, 7, 16)  # each layer, q as [batch, heads, tokens, head]
        torch.testing.assert_close(got, expected)
        with pytest.raises(RuntimeError), rotary_embedding_as(model, counted):
            raise RuntimeError
    assert modeling_llama.apply_rotary_pos_emb is original


def test_a_layer_taken_out_of_checkpointing_saves_its_tensors_and_gives_the_same_gradients(tiny_model):
    """transformers checkpoints each decoder layer whose instance flag is on (what it saves for backward
    is dropped and recomputed, unseen by outer saved-tensor hooks); with one layer's flag off that layer
    hands its saved tensors to the outer hooks, as activation offload needs, and the gradients are the same."""
    import torch
    from transformers import AutoModelForCausalLM

    from lqmf.engine.compat import checkpointed_layers, set_layer_checkpointing

    def packs_and_gradients(model) -> tuple[int, list]:
        ids = torch.tensor([[1, 2, 3, 4]])
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        model.zero_grad()
        loss.backward()
        return len(packed), [p.grad.clone() for p in model.parameters()]

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    layers = checkpointed_layers(model)
    assert len(layers) == model.config.num_hidden_layers == 2
    every, grads = packs_and_gradients(model)
    set_layer_checkpointing(layers[0], False)
    kept, kept_grads = packs_and_gradients(model)
    assert kept >= every + 7  # at least the inputs of its seven linears, whose weights train here
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, kept_grads, strict=True))
