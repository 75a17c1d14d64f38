"""Unsloth's QLoRA training beside hf_qlora_baseline.py (TRAIN_ONLY=1): same model, tokens and recipe.

The randomly initialised Mistral-7B-shaped model at /tmp/m7b (built, with a 32,000-token tokenizer,
by gpu_train_bench.ensure_model when missing; Unsloth's loader needs the tokenizer), loaded with
FastLanguageModel.from_pretrained (NF4 double quant, bf16 compute: Unsloth's own BitsAndBytesConfig),
LoRA r=16 alpha 32 dropout 0.05 on q/k/v/o via FastLanguageModel.get_peft_model with
use_gradient_checkpointing="unsloth", then a plain transformers Trainer on the baseline's exact token
sequences (torch.Generator seeded with the row index, ids in [3, 32000), loss on every token),
paged_adamw_8bit, micro-batch BS x accumulation GA (default 2 x 8), SEQ tokens, STEPS optimizer steps.
Step time: the median of the step-to-step intervals after the first, as in the HF script.

Prints `RESULT {json}` (train_tok_s, step_s_median, peak_alloc_gb, peak_reserved_gb, mfu in
gpu_train_bench.py's convention, library versions) and writes $OUT/unsloth_train.json; on any failure
prints `RESULT {"error": ...}` with the traceback's last lines and the stage it reached, and exits 1.

Needs the image's transformers (Unsloth pins <= 5.17), Unsloth and its wheels first on PYTHONPATH, and
runs offline (HF_HUB_OFFLINE=1, UNSLOTH_DISABLE_STATISTICS=1): see benchmarks/unsloth_train.sh.

    SEQ=2048 STEPS=4 OUT=/tmp/out PYTHONPATH=/tmp/usite:$PWD/benchmarks python3 benchmarks/baseline/unsloth_qlora.py

benchmarks/unsloth_train.sh runs it at 512 and 2048 tokens with the wheels it needs.
"""

import json
import os
import signal
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = os.path.dirname(HERE)
SRC = os.path.join(os.path.dirname(BENCHMARKS), "src")  # lqmf.engine.tiny builds the tokenizer (ensure_model)
OUT = os.environ.get("OUT", "/tmp/out")
SEQ = int(os.environ.get("SEQ", 512))
BS = int(os.environ.get("BS", 2))
GA = int(os.environ.get("GA", 8))
STEPS = int(os.environ.get("STEPS", 6))
PATH = "/tmp/m7b"
VOCAB = 32000


class Stopped(BaseException):
    """SIGTERM (timeout) turned into an exception, so the RESULT line still says how far the run got."""


def _on_sigterm(signum, frame):
    raise Stopped(f"signal {signum}")


class DS:
    """The HF script's tokens, row for row (a map-style dataset; module level, so workers can pickle it)."""

    def __len__(self):
        return 100000

    def __getitem__(self, i):
        import torch

        g = torch.Generator().manual_seed(i)
        ids = torch.randint(3, VOCAB, (SEQ,), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def main(res):
    res["stage"] = "import unsloth"
    import unsloth  # first: Unsloth patches transformers, peft and trl at import
    from unsloth import FastLanguageModel

    res["stage"] = "import libraries"
    import bitsandbytes
    import peft
    import torch
    import transformers
    import trl
    import unsloth_zoo

    res.update(unsloth=unsloth.__version__, unsloth_zoo=unsloth_zoo.__version__, torch=torch.__version__,
               transformers=transformers.__version__, trl=trl.__version__, peft=peft.__version__,
               bnb=bitsandbytes.__version__)
    res["stage"] = "cuda"
    res["gpu"] = torch.cuda.get_device_name(0)

    res["stage"] = "ensure model"
    for path in (SRC, BENCHMARKS):
        if path not in sys.path:
            sys.path.insert(0, path)
    from gpu_train_bench import ensure_model, mfu

    t = time.time()
    ensure_model()  # no-op when /tmp/m7b has config.json and tokenizer.json
    res["params"] = 7241732096
    res["make_model_s"] = round(time.time() - t, 1)
    print(res, flush=True)

    res["stage"] = "from_pretrained"
    torch.cuda.reset_peak_memory_stats()
    t = time.time()
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=PATH, max_seq_length=SEQ, load_in_4bit=True,
                                                         dtype=torch.bfloat16)
    res["load_4bit_s"] = round(time.time() - t, 1)
    res["vram_after_load_gb"] = round(torch.cuda.memory_allocated() / 2**30, 3)

    res["stage"] = "get_peft_model"
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             use_gradient_checkpointing="unsloth", random_state=3407,
                                             max_seq_length=SEQ)
    res["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    class Timer(transformers.TrainerCallback):
        def __init__(self):
            self.t = []

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.t.append(time.time())

    res["stage"] = "trainer"
    args = transformers.TrainingArguments(
        output_dir="/tmp/tr-unsloth", per_device_train_batch_size=BS, gradient_accumulation_steps=GA,
        max_steps=STEPS, learning_rate=2e-4, bf16=True, optim="paged_adamw_8bit", gradient_checkpointing=True,
        logging_steps=1, report_to=[], save_strategy="no", dataloader_num_workers=2)
    timer = Timer()
    torch.cuda.reset_peak_memory_stats()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=DS(), callbacks=[timer])
    res["trainer_class"] = type(trainer).__module__ + "." + type(trainer).__qualname__
    res["stage"] = "train"
    trainer.train()
    res["stage"] = "done"
    steps = [b - a for a, b in zip(timer.t[:-1], timer.t[1:], strict=False)]
    step_s = sorted(steps[1:])[len(steps[1:]) // 2] if len(steps) > 2 else steps[-1]
    res.update(seq=SEQ, bs=BS, ga=GA, steps=STEPS, step_s_all=[round(s, 3) for s in steps],
               step_s_median=round(step_s, 3), train_tok_s=round(BS * GA * SEQ / step_s, 1),
               peak_alloc_gb=round(torch.cuda.max_memory_allocated() / 2**30, 3),
               peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 2**30, 3))
    res["mfu_4N_vs_790T"] = round(4 * 7.24e9 * res["train_tok_s"] / 790e12, 4)
    res["mfu"] = mfu(res["train_tok_s"], SEQ)
    losses = [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
    res["losses"] = losses


def write(res, name="unsloth_train.json"):
    try:
        os.makedirs(OUT, exist_ok=True)
        with open(os.path.join(OUT, name), "w") as handle:
            json.dump(res, handle, indent=1, default=str)
    except OSError as error:
        print(f"could not write {OUT}/{name}: {error!r}", flush=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_sigterm)
    res = {"seq": SEQ, "bs": BS, "ga": GA, "steps": STEPS}
    try:
        main(res)
    except BaseException as error:  # one remote try must say what stopped it, a timeout's SIGTERM too
        lines = traceback.format_exc().strip().splitlines()
        res["error"] = f"{type(error).__name__}: {error}"[:1500]
        res["traceback"] = lines[-14:]
        print("RESULT", json.dumps(res, default=str), flush=True)
        write(res)
        sys.exit(1)
    print("RESULT", json.dumps(res, default=str), flush=True)
    write(res)
