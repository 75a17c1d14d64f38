"""Anchor run: the canonical HF Trainer + PEFT + bitsandbytes QLoRA recipe on a
randomly initialised Mistral-7B-shaped model (speed and memory do not depend on
weight values). Prints peak VRAM, tokens/s, adapter load/switch latency and
generation tokens/s with and without an unmerged adapter."""
import json, os, sys, time, shutil
import torch
import transformers, peft
from transformers import (MistralConfig, MistralForCausalLM, BitsAndBytesConfig,
                          Trainer, TrainingArguments, AutoModelForCausalLM)
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training, PeftModel

OUT = os.environ.get("OUT", "/tmp/out")
res = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
import bitsandbytes; res["bnb"] = bitsandbytes.__version__
res["gpu"] = torch.cuda.get_device_name(0)
SEQ = int(os.environ.get("SEQ", 512)); BS = int(os.environ.get("BS", 2)); GA = int(os.environ.get("GA", 8))
path = "/tmp/m7b"
cfg = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
t = time.time()
# LQMF copy: the one change to the canonical recipe is to reuse /tmp/m7b when an earlier run in
# the same session built it (the weights are random either way); training is untouched.
if not os.path.exists(os.path.join(path, "config.json")):
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        m = MistralForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    m.save_pretrained(path)
    del m; torch.cuda.empty_cache()
res["params"] = 7241732096
res["make_model_s"] = round(time.time() - t, 1)
print(res, flush=True)

bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.bfloat16)
torch.cuda.reset_peak_memory_stats()
t = time.time()
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.bfloat16, device_map={"": 0})
res["load_4bit_s"] = round(time.time() - t, 1)
res["vram_after_load_gb"] = round(torch.cuda.memory_allocated() / 2**30, 3)
model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
model = get_peft_model(model, lcfg)
res["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

class DS(torch.utils.data.Dataset):
    def __len__(self): return 100000
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(3, 32000, (SEQ,), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

class Timer(transformers.TrainerCallback):
    def __init__(self): self.t = []
    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize(); self.t.append(time.time())
STEPS = int(os.environ.get("STEPS", 6))
args = TrainingArguments(output_dir="/tmp/tr", per_device_train_batch_size=BS, gradient_accumulation_steps=GA,
                         max_steps=STEPS, learning_rate=2e-4, bf16=True, optim="paged_adamw_8bit",
                         gradient_checkpointing=True, logging_steps=1, report_to=[], save_strategy="no",
                         dataloader_num_workers=2)
timer = Timer()
torch.cuda.reset_peak_memory_stats()
tr = Trainer(model=model, args=args, train_dataset=DS(), callbacks=[timer])
t0 = time.time(); tr.train()
steps = [b - a for a, b in zip(timer.t[:-1], timer.t[1:])]
step_s = sorted(steps[1:])[len(steps[1:]) // 2] if len(steps) > 2 else steps[-1]
res.update(seq=SEQ, bs=BS, ga=GA, step_s_median=round(step_s, 3), train_tok_s=round(BS * GA * SEQ / step_s, 1),
           peak_alloc_gb=round(torch.cuda.max_memory_allocated() / 2**30, 3),
           peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 2**30, 3))
N = 7.24e9
res["mfu_4N_vs_790T"] = round(4 * N * res["train_tok_s"] / 790e12, 4)
print(res, flush=True)
# LQMF copy: TRAIN_ONLY=1 stops after the training figures (for benchmarks/train_side_by_side.sh), with
# MFU in gpu_train_bench.py's convention (6 N + 12 L h s FLOPs per token against the card's bf16 peak).
if os.environ.get("TRAIN_ONLY") == "1":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from gpu_train_bench import mfu
    res["mfu"] = mfu(res["train_tok_s"], SEQ)
    print("RESULT", json.dumps(res), flush=True)
    os.makedirs(OUT, exist_ok=True)
    json.dump(res, open(os.path.join(OUT, "hf_train.json"), "w"), indent=1)
    sys.exit(0)

# adapter save / load / switch
model.save_pretrained("/tmp/ad1")
model.eval()
base = model.get_base_model() if hasattr(model, "get_base_model") else model
# make a 2nd adapter dir with different weights
for n, p in model.named_parameters():
    if "lora_B" in n: p.data.normal_(0, 0.01)
model.save_pretrained("/tmp/ad2")
res["adapter_mb"] = round(os.path.getsize("/tmp/ad1/adapter_model.safetensors") / 2**20, 2)
loads = []
for i in range(5):
    torch.cuda.synchronize(); t = time.time()
    model.load_adapter("/tmp/ad2", adapter_name=f"a{i}")
    model.set_adapter(f"a{i}")
    torch.cuda.synchronize(); loads.append(time.time() - t)
res["load_adapter_s"] = [round(x, 3) for x in loads]
sw = []
for i in range(5):
    torch.cuda.synchronize(); t = time.time()
    model.set_adapter("default" if i % 2 else "a0"); torch.cuda.synchronize(); sw.append(time.time() - t)
res["set_adapter_s_median"] = round(sorted(sw)[2], 5)
try:
    from peft.utils.hotswap import hotswap_adapter
    hs = []
    for i in range(3):
        torch.cuda.synchronize(); t = time.time()
        hotswap_adapter(model, "/tmp/ad1" if i % 2 else "/tmp/ad2", adapter_name="a0", torch_device="cuda:0")
        torch.cuda.synchronize(); hs.append(time.time() - t)
    res["hotswap_s"] = [round(x, 3) for x in hs]
except Exception as e:
    res["hotswap_err"] = repr(e)[:200]

# generation tokens/s, base (adapters disabled) vs adapter active
model.config.use_cache = True
ids = torch.randint(3, 32000, (1, 64), device="cuda")
def gen():
    torch.cuda.synchronize(); t = time.time()
    out = model.generate(input_ids=ids, max_new_tokens=128, min_new_tokens=128, do_sample=False)
    torch.cuda.synchronize(); return 128 / (time.time() - t)
with torch.no_grad():
    model.set_adapter("a0"); gen()
    with model.disable_adapter():
        gen(); base_tps = sorted(gen() for _ in range(3))[1]
    ad_tps = sorted(gen() for _ in range(3))[1]
res["gen_tok_s_base"] = round(base_tps, 1); res["gen_tok_s_adapter"] = round(ad_tps, 1)
res["adapter_gen_overhead_pct"] = round(100 * (base_tps / ad_tps - 1), 1)
print("RESULT", json.dumps(res), flush=True)
os.makedirs(OUT, exist_ok=True)
json.dump(res, open(os.path.join(OUT, "anchor.json"), "w"), indent=1)
