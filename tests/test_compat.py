"""Each library internal that engine/compat.py touches, checked as the code uses it: an upgrade that
changes one fails here, by name, instead of deep inside a model."""

from __future__ import annotations

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


def test_cache_keyword_is_the_one_the_model_fills(tiny_model):
    """The static-cache decoder passes its cache under this keyword; a keyword the model ignored would
    leave the cache empty (transformers 5.17 takes past_key_values, 5.24 cache)."""
    from transformers import AutoModelForCausalLM, StaticCache

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    keyword = compat.cache_keyword(model)
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 5, 9]]), use_cache=True, **{keyword: cache})
    assert int(cache.layers[0].cumulative_length) == 3


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


def test_share_children_keeps_names_and_sees_replacements():
    import torch

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
