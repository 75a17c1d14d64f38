"""Measure what one real LQMF training step holds on the CPU, for test_memory.py.

Run in a fresh interpreter with MALLOC_MMAP_THRESHOLD_ set low, so that glibc serves every large
tensor with its own mmap and returns it on free: the process's resident set then follows the live
tensors. For each case (a JSON list on argv[1]) it builds a random Llama, sets it up exactly as
`lqmf train` does (engine.train.setup_model: LoRA, 4-bit or not, gradient checkpointing), and prints:
  weights_bytes: the parameters and quantization state of the model, counted tensor by tensor;
  step_bytes: the rise of the RSS high-water mark (reset through /proc/self/clear_refs) over one
    forward + backward of the engine's own loss, on the second step (the first makes one-time allocations).
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _tensor_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.nbytes
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            total += state.absmax.nbytes + state.code.nbytes
            if state.nested:
                total += state.state2.absmax.nbytes + state.state2.code.nbytes
    return total


def measure(case: dict, root: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lqmf.core.config import TrainConfig
    from lqmf.core.models import ModelCatalogue
    from lqmf.core.workspace import Workspace
    from lqmf.engine import data as data_mod
    from lqmf.engine.tiny import build_tokenizer
    from lqmf.engine.train import loop as engine

    path = root / f"llama-{case['hidden']}-{case['inter']}-{case['layers']}-{case['vocab']}"
    if not path.exists():
        config = LlamaConfig(vocab_size=case["vocab"], hidden_size=case["hidden"], intermediate_size=case["inter"],
                             num_hidden_layers=case["layers"], num_attention_heads=case["heads"],
                             num_key_value_heads=case["kv_heads"], max_position_embeddings=2048, bos_token_id=1,
                             eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
        build_tokenizer().save_pretrained(path)
    resolved = ModelCatalogue(Workspace(root)).resolve(str(path))
    config = TrainConfig(base_model=str(path), task_type="chat", lora_r=case["rank"], device="cpu",
                         learning_rate=1e-3, use_4bit_quantization=case["four_bit"],
                         use_gradient_checkpointing=case["checkpointing"])
    prepared = engine.Prepared([], [], [], 1, 1, 1, 1, 0, 0, [], "model")
    model = engine.setup_model(config, resolved, prepared, "chat").model
    if case.get("tiled"):
        from lqmf.engine.fused.blocks import tile_mlps

        tile_mlps(model)
    optimizer, _ = engine.make_optimizer(config, model, "cpu")
    batch_size, length = case["batch"], case["seq"]
    ids = torch.randint(10, case["vocab"], (batch_size, length), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    if case["padded"]:
        rows[0] = {key: value[: length // 2] for key, value in rows[0].items()}
    batch = data_mod.collate(rows, 3, classification=False)
    model.train()
    for step_batch in (batch, batch):  # the first step also makes one-time allocations: not measured
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        before = _status("VmRSS")
        loss = engine.answer_loss_sum(model, step_batch)
        (loss / 100).backward()
        step_bytes = _status("VmHWM") - before
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
    return {"weights_bytes": _tensor_bytes(model), "step_bytes": step_bytes}


def main() -> None:
    from lqmf.engine.loading import quiet_libraries

    quiet_libraries()
    cases = json.loads(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps([measure(case, Path(tmp)) for case in cases]))


if __name__ == "__main__":
    main()
