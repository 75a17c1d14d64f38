"""Check the adapter a multi-GPU `lqmf train` saved: every LoRA pair present and trained, PEFT loads it,
and `lqmf test` answers with it. Run after benchmarks/gpu_train_bench.py (the adapter it leaves in
/tmp/lqmf-bench-ws):

    PYTHONPATH=src python3 benchmarks/fsdp_adapter_check.py bench-2048-2-2-fsdp --out $OUT/fsdp-check.json

Prints and writes one JSON record: tensor count, LoRA B matrices still zero (untrained), the
largest |B|, whether peft.PeftModel loads it onto the base, and the `lqmf test --json` answer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

WORKSPACE = Path("/tmp/lqmf-bench-ws")


def tensor_report(folder: Path) -> dict:
    from safetensors.torch import load_file

    state = load_file(str(folder / "adapter_model.safetensors"))
    b_norms = {key: float(tensor.float().abs().max()) for key, tensor in state.items() if ".lora_B." in key}
    return {"tensors": len(state), "lora_a": sum(".lora_A." in key for key in state), "lora_b": len(b_norms),
            "lora_b_all_zero": sum(value == 0.0 for value in b_norms.values()),
            "lora_b_max_abs": max(b_norms.values(), default=0.0)}


def peft_loads(folder: Path, base: str) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map={"": 0})
    model = PeftModel.from_pretrained(model, str(folder))
    layers = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A.default"))
    return {"peft_lora_layers": layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    folder = WORKSPACE / "adapters" / args.adapter
    manifest = json.loads((folder / "lqmf.json").read_text())
    record = {"adapter": args.adapter, "runtime": manifest["runtime"], **tensor_report(folder),
              **peft_loads(folder, manifest["base_model"]["path"] or manifest["base_model"]["reference"])}
    answer = subprocess.run([sys.executable, "-m", "lqmf", "--workspace", str(WORKSPACE), "test", args.adapter,
                             "Hello", "--max-new-tokens", "8", "--local", "--json"], capture_output=True, text=True)
    record["lqmf_test_exit"] = answer.returncode
    try:  # with --json an error is a JSON object on stdout too
        record["lqmf_test"] = json.loads(answer.stdout)
    except ValueError:
        record["lqmf_test"] = {"stdout": answer.stdout[-1000:], "stderr": answer.stderr[-1000:]}
    print(json.dumps(record), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
