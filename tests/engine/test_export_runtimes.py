"""`lqmf export --format gguf | ollama | vllm`: the files each runtime loads, checked against what it requires
(without the runtimes: GGUF structure with gguf.GGUFReader, the Modelfile's syntax and template, vLLM's
adapter rules), the one-line refusals, and the llama.cpp round trip where llama-cpp-python is installed."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lqmf.core.errors import InputError
from lqmf.core.export_formats import GGUF_ARCHITECTURES, runtime_spec
from tests.helpers import REPO, copy_adapter

LLAMA_PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                     "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def llama_permute(rows, n_head: int):
    """llama.cpp's converter reordering of q/k weight rows (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def gguf_tensor(tensor):
    from gguf import quants

    return quants.dequantize(tensor.data, tensor.tensor_type).reshape([int(n) for n in reversed(tensor.shape)])


def test_gguf_adapter_has_every_pair_named_and_shaped_as_llama_cpp_maps_them(cli, workspace, trained_workspace,
                                                                            tiny_model, tmp_path):
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    copy_adapter(trained_workspace, "chat-a", workspace)
    out = json.loads(cli("export", "chat-a", f"{tmp_path}/", "--format", "gguf", "--outtype", "f32",
                         "--json").stdout)
    folder = tmp_path / "chat-a-gguf"
    assert out["path"] == str(folder) and out["format"] == "gguf"
    assert set(out["files"]) == {"chat-a.gguf", "README.md", "SHA256SUMS", "lqmf.json", "lqmf-export.json"}
    assert out["command"] == f"llama-cli -m BASE.gguf --lora {folder / 'chat-a.gguf'}"
    reader = gguf.GGUFReader(folder / "chat-a.gguf")
    fields = gguf_fields(reader)
    lora = json.loads((workspace / "adapters" / "chat-a" / "adapter_config.json").read_text())
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == lora["lora_alpha"]
    config = json.loads((tiny_model / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    peft = load_file(str(workspace / "adapters" / "chat-a" / "adapter_model.safetensors"))
    tensors = {t.name: t for t in reader.tensors}
    expected = set()
    for key, a in peft.items():
        if ".lora_A." not in key:
            continue
        hf_name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        expected |= {f"{name}.lora_a", f"{name}.lora_b"}
        b = peft[key.replace("lora_A", "lora_B")]
        lora_a, lora_b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        # ggml shapes: lora_a [n_in, r] like the base tensor's first dim, lora_b [r, n_out]
        assert [int(n) for n in lora_a.shape] == [a.shape[1], a.shape[0]]
        assert [int(n) for n in lora_b.shape] == [b.shape[1], b.shape[0]]
        assert lora_a.tensor_type == lora_b.tensor_type == gguf.GGMLQuantizationType.F32
        delta = gguf_tensor(lora_b) @ gguf_tensor(lora_a)
        heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
        module = hf_name.split(".")[-2]
        want = llama_permute(b @ a, heads[module]) if module in heads else b @ a
        np.testing.assert_allclose(delta, want, rtol=1e-5, atol=1e-7)
    assert set(tensors) == expected and len(expected) == 2 * len(peft) // 2
    assert any(name.endswith("attn_q.weight.lora_b") for name in tensors)


@pytest.mark.parametrize("outtype,a_type,b_type", [("f16", "F16", "F16"), ("bf16", "BF16", "BF16"),
                                                   ("q8_0", "Q8_0", "F16")])  # rank 16 rows: no Q8_0 block
def test_gguf_outtypes(cli, workspace, trained_workspace, tmp_path, outtype, a_type, b_type):
    import gguf

    copy_adapter(trained_workspace, "chat-a", workspace)
    out = json.loads(cli("export", "chat-a", tmp_path / "x", "--format", "gguf", "--outtype", outtype,
                         "--json").stdout)
    reader = gguf.GGUFReader(tmp_path / "x" / out["gguf_file"])
    types = {t.name.rsplit(".", 1)[1]: t.tensor_type.name for t in reader.tensors}
    assert types == {"lora_a": a_type, "lora_b": b_type}


def fake_adapter(folder: Path, modules: list[str], *, layers: int = 2, hidden: int = 64, rank: int = 8,
                 heads: int = 4, kv_heads: int = 2, extra_keys=(), **config):
    """A PEFT LoRA folder with random pairs on `modules` of a Llama-shaped model (no model needed)."""
    import torch
    from safetensors.torch import save_file

    head_dim = hidden // heads
    outs = {"q_proj": hidden, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim, "o_proj": hidden,
            "gate_proj": 2 * hidden, "up_proj": 2 * hidden, "down_proj": hidden, "fc1": hidden}
    ins = {"down_proj": 2 * hidden}
    tensors = {}
    generator = torch.Generator().manual_seed(0)
    for layer in range(layers):
        for module in modules:
            prefix = f"base_model.model.model.layers.{layer}.{LLAMA_PROJECTIONS.get(module, 'mlp')}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, ins.get(module, hidden), generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(outs[module], rank, generator=generator)
    for key in extra_keys:
        tensors[key] = torch.randn(4, hidden, generator=generator)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    adapter_config = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": modules, "bias": "none",
                      "modules_to_save": None, "use_dora": False, **config}
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
    base = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "hidden_size": hidden, "num_hidden_layers": layers, "tie_word_embeddings": False}
    return SimpleNamespace(name="fake", path=folder, manifest={"task": "chat"}), base


@pytest.mark.parametrize("architecture,gguf_arch,gguf_enum", [
    ("LlamaForCausalLM", "llama", "LLAMA"), ("MistralForCausalLM", "llama", "LLAMA"),
    ("Qwen2ForCausalLM", "qwen2", "QWEN2"), ("GemmaForCausalLM", "gemma", "GEMMA"),
    ("Gemma2ForCausalLM", "gemma2", "GEMMA2"), ("Qwen3ForCausalLM", "qwen3", "QWEN3")])
def test_each_family_maps_to_the_names_llama_cpp_gives_its_tensors(tmp_path, architecture, gguf_arch, gguf_enum):
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from lqmf.engine.gguf_adapter import write_gguf_adapter

    entry, base = fake_adapter(tmp_path / "a", list(LLAMA_PROJECTIONS))
    base["architectures"] = [architecture]
    spec = runtime_spec("gguf", entry, base, "some/base")
    assert spec.architecture == gguf_arch and GGUF_ARCHITECTURES[architecture].name == gguf_arch
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, gguf_enum), 2)
    for pair in spec.pairs:
        hf_name = pair.a_key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        assert pair.gguf_name == names.get_name(hf_name, try_suffixes=(".weight",))
    write_gguf_adapter(entry.path / "adapter_model.safetensors", spec.pairs, tmp_path / "a.gguf",
                       architecture=spec.architecture, alpha=spec.alpha, outtype="f32", name="fake")
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert gguf_fields(reader)["general.architecture"] == gguf_arch
    tensors = {t.name: gguf_tensor(t) for t in reader.tensors}
    assert len(tensors) == 2 * 7 * 2
    peft = load_file(str(entry.path / "adapter_model.safetensors"))
    q_b = peft["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    permuted = gguf_arch == "llama"  # only the Llama converter reorders q/k rows (Qwen2, Gemma: NEOX rope)
    np.testing.assert_allclose(tensors["blk.0.attn_q.weight.lora_b"], llama_permute(q_b, 4) if permuted else q_b)
    assert not np.allclose(llama_permute(q_b, 4), q_b)


def test_rslora_and_alpha_pattern_are_folded_into_lora_b(tmp_path):
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from lqmf.engine.gguf_adapter import write_gguf_adapter

    entry, base = fake_adapter(tmp_path / "a", ["v_proj", "o_proj"], rank=16, use_rslora=True,
                               alpha_pattern={"o_proj": 64})
    spec = runtime_spec("gguf", entry, base, "b")
    write_gguf_adapter(entry.path / "adapter_model.safetensors", spec.pairs, tmp_path / "a.gguf",
                       architecture=spec.architecture, alpha=spec.alpha, outtype="f32", name="fake")
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    alpha = gguf_fields(reader)["adapter.lora.alpha"]
    tensors = {t.name: gguf_tensor(t) for t in reader.tensors}
    peft = load_file(str(entry.path / "adapter_model.safetensors"))
    for module, peft_alpha in (("v_proj", 16), ("o_proj", 64)):
        key = f"base_model.model.model.layers.1.self_attn.{module}.lora_"
        name = f"blk.1.{'attn_v' if module == 'v_proj' else 'attn_output'}.weight"
        llama_cpp = alpha / 16 * tensors[f"{name}.lora_b"] @ tensors[f"{name}.lora_a"]  # llama.cpp: alpha / rank
        peft_delta = peft_alpha / np.sqrt(16) * peft[key + "B.weight"] @ peft[key + "A.weight"]  # rsLoRA
        np.testing.assert_allclose(llama_cpp, peft_delta, rtol=1e-5, atol=1e-4)


REFUSALS = [
    ("dora", {"use_dora": True}, {}, "gguf", "DoRA adapter (use_dora)"),
    ("saved-head", {"modules_to_save": ["lm_head"]}, {}, "gguf", "saves full embedding or head weights"),
    ("saved-embedding-tensor", {}, {"extra_keys": ["base_model.model.model.embed_tokens.weight"]}, "vllm",
     "a full embedding or head weight"),
    ("bias", {"bias": "lora_only"}, {}, "vllm", "trains biases"),
    ("unsupported-target", {}, {"modules": ["q_proj", "fc1"]}, "gguf", "targets 'fc1'"),
    ("not-lora", {"peft_type": "IA3"}, {}, "ollama", "IA3 adapter"),
    ("rank-over-vllm", {}, {"rank": 640}, "vllm", "above vLLM's largest --max-lora-rank 512"),
    ("unknown-architecture", {}, {"architecture": "GPT2LMHeadModel"}, "gguf", "GPT2LMHeadModel) is not an arch"),
    ("tied-head", {}, {"modules": ["lm_head"], "tied": True}, "gguf", "ties to its embeddings"),
]


@pytest.mark.parametrize("case,config,shape,fmt,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_what_a_runtime_cannot_take_is_refused_in_one_line(tmp_path, case, config, shape, fmt, message):
    modules = shape.pop("modules", ["q_proj", "v_proj"])
    architecture, tied = shape.pop("architecture", None), shape.pop("tied", False)
    head = modules == ["lm_head"]
    entry, base = fake_adapter(tmp_path / "a", [] if head else modules, **shape, **config)
    if head:
        import torch
        from safetensors.torch import save_file

        save_file({"base_model.model.lm_head.lora_A.weight": torch.ones(8, 64),
                   "base_model.model.lm_head.lora_B.weight": torch.ones(100, 8)},
                  str(entry.path / "adapter_model.safetensors"))
    base["tie_word_embeddings"] = tied
    if architecture:
        base["architectures"] = [architecture]
    with pytest.raises(InputError) as refused:
        runtime_spec(fmt, entry, base, "some/base")
    assert message in refused.value.message and "\n" not in refused.value.message


def test_refusals_reach_the_cli_as_one_line_and_write_nothing(cli, workspace, trained_workspace, tmp_path):
    folder = copy_adapter(trained_workspace, "chat-a", workspace)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["use_dora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(config))
    manifest = json.loads((folder / "lqmf.json").read_text())
    data = (folder / "adapter_config.json").read_bytes()
    manifest["files"]["adapter_config.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "lqmf.json").write_text(json.dumps(manifest))
    for fmt in ("gguf", "ollama", "vllm"):
        result = cli("export", "chat-a", tmp_path / fmt, "--format", fmt)
        assert result.exit_code == 2 and "DoRA adapter" in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / fmt).exists()
    copy_adapter(trained_workspace, "sent", workspace)
    result = cli("export", "sent", tmp_path / "s", "--format", "vllm")
    assert result.exit_code == 2 and "classification adapter" in result.stderr
    assert cli("export", "chat-a", tmp_path / "g", "--format", "gguf", "--merge").exit_code == 2
    assert cli("export", "chat-a", tmp_path / "g", "--format", "exe").exit_code == 2
    assert cli("export", "chat-a", tmp_path / "g", "--format", "gguf", "--outtype", "q4_k").exit_code == 2
    assert cli("export", "chat-a", tmp_path / "g", "--format", "vllm", "--outtype", "f32").exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]


# ----------------------------------------------------------------------------- Ollama

MODELFILE_INSTRUCTIONS = ("FROM", "ADAPTER", "TEMPLATE", "PARAMETER", "SYSTEM", "MESSAGE", "LICENSE")


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """Instructions of a Modelfile as Ollama's parser reads them: INSTRUCTION args, \"\"\"-quoted multiline."""
    commands, rest = [], text
    while rest.strip():
        rest = rest.lstrip("\n")
        match = re.match(r'([A-Z]+) ("""(.*?)"""|[^\n]*)\n?', rest, re.S)
        assert match, rest[:40]
        assert match[1] in MODELFILE_INSTRUCTIONS, match[1]
        commands.append((match[1], match[3] if match[3] is not None else match[2]))
        rest = rest[match.end():]
    return commands


def go_render(template: str, system: str, prompt: str) -> str:
    """Ollama's Go template for one turn, with the only constructs lqmf writes."""
    branch = re.fullmatch(r"\{\{ if \.System \}\}(.*)\{\{ else \}\}(.*)\{\{ end \}\}\{\{ \.Response \}\}", template,
                          re.S)
    body = (branch[1] if system else branch[2]) if branch else template.removesuffix("{{ .Response }}")
    assert "{{ .Response }}" in template and "{{ .Prompt }}" in body
    return body.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt)


def test_ollama_modelfile_has_the_base_the_adapter_and_the_training_template(cli, workspace, trained_workspace,
                                                                            tiny_model, tmp_path):
    from transformers import AutoTokenizer

    copy_adapter(trained_workspace, "chat-a", workspace)
    out = json.loads(cli("export", "chat-a", f"{tmp_path}/", "--format", "ollama", "--json").stdout)
    folder = tmp_path / "chat-a-ollama"
    assert out["command"] == f"ollama create chat-a -f {folder / 'Modelfile'}"
    assert {"Modelfile", "chat-a.gguf", "lqmf-export.json"} <= set(out["files"])
    commands = parse_modelfile((folder / "Modelfile").read_text())
    values = dict(commands)
    assert commands[0] == ("FROM", str(tiny_model)) and (Path(values["FROM"]) / "config.json").is_file()
    assert values["ADAPTER"] == "./chat-a.gguf" and (folder / values["ADAPTER"]).is_file()
    assert [v for k, v in commands if k == "PARAMETER"] == ['stop "</s>"']
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for system in ("", "Be brief."):
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": "What is AI?"}]
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert go_render(values["TEMPLATE"], system, "What is AI?") == expected


def test_ollama_template_of_a_model_without_one_is_lqmf_default(tiny_model_no_template):
    from lqmf.core.models import ModelCatalogue
    from lqmf.core.workspace import Workspace
    from lqmf.engine.export import ollama_prompt_format

    base = ModelCatalogue(Workspace(tiny_model_no_template.parent)).resolve(str(tiny_model_no_template))
    prompt = ollama_prompt_format(base)
    assert go_render(prompt.template, "", "Hi") == "### User:\nHi\n\n### Assistant:\n"
    assert prompt.stops == ("</s>", "### User:")


# ----------------------------------------------------------------------------- vLLM

VLLM_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


def test_vllm_folder_meets_vllms_adapter_rules_and_names_its_serve_line(cli, workspace, trained_workspace,
                                                                       tiny_model, tmp_path):
    from safetensors import safe_open

    copy_adapter(trained_workspace, "chat-a", workspace)
    out = json.loads(cli("export", "chat-a", f"{tmp_path}/", "--format", "vllm", "--json").stdout)
    folder = tmp_path / "chat-a-vllm"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none" and not config.get("use_dora")
    assert not config.get("modules_to_save") and set(config["target_modules"]) <= VLLM_TARGETS
    assert out["max_lora_rank"] == 16 and config["r"] <= out["max_lora_rank"]  # vLLM: r <= --max-lora-rank
    with safe_open(str(folder / "adapter_model.safetensors"), "np") as weights:
        for key in weights.keys():  # vLLM's parse_fine_tuned_lora_name takes these and nothing else
            assert re.fullmatch(r"base_model\.model\.model\.layers\.\d+\.\w+\.\w+\.lora_[AB]\.weight", key), key
    assert out["command"] == (f"vllm serve {tiny_model} --enable-lora --lora-modules chat-a={folder} "
                              "--max-lora-rank 16")
    assert "--enable-lora" in (folder / "README.md").read_text()


@pytest.mark.parametrize("fmt", ["vllm", "ollama"])
def test_merge_variants_write_a_model_the_runtime_loads_alone(cli, workspace, trained_workspace, tmp_path, fmt):
    copy_adapter(trained_workspace, "chat-a", workspace)
    out = json.loads(cli("export", "chat-a", f"{tmp_path}/", "--format", fmt, "--merge", "--json").stdout)
    folder = tmp_path / f"chat-a-{fmt}-merged"
    assert out["format"] == f"{fmt}-merged" and (folder / "config.json").is_file()
    assert not (folder / "adapter_config.json").exists() and not list(folder.glob("*.gguf"))
    if fmt == "vllm":
        assert out["command"] == f"vllm serve {folder}"
    else:
        assert out["command"] == f"ollama create chat-a -f {folder / 'Modelfile'}"
        commands = dict(parse_modelfile((folder / "Modelfile").read_text()))
        assert commands["FROM"] == "." and "ADAPTER" not in commands and "{{ .Prompt }}" in commands["TEMPLATE"]


# ----------------------------------------------------------------------------- llama.cpp itself

@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (it compiles llama.cpp; not a dev dependency)")
def test_llama_cpp_computes_what_peft_computes(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gguf_roundtrip
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    rows = gguf_roundtrip.roundtrip(tmp_path, ["f32"], steps=10)
    assert all(row["ok"] for row in rows), rows
    assert rows[1]["file_vs_peft"] < 1e-6, "the pairs read back from the GGUF are PEFT's"
    assert rows[-1]["adapter_effect"] > 0.1, "the adapter changes the logits (the comparison can fail)"
