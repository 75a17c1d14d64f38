"""The GPU check: the fast path gives what stock PEFT + transformers' `generate` give, on a 4-bit model.

Skipped without CUDA; run on a GPU machine with `make gpu-check` (benchmarks/gpu_check.sh).

The model is a random 4-layer Llama (hidden 256), loaded 4-bit NF4 by bitsandbytes, with three
LoRA adapters trained here for a few steps. The reference ("stock") is the same base with PEFT's own
LoRA layers, `LQMF_FAST=0`. Both paths run the same 4-bit weights in bfloat16, but add in a different
order (fused q/k/v and gate/up products, LoRA riding in the base GEMV, our attention over a static
cache, one token at a time against a whole sequence), so logits differ by bfloat16 rounding.

Tolerances, and why:
- Logits: |fast - stock| <= LOGIT_TOL x the largest |stock logit| of that position. bfloat16 keeps
  8 bits of mantissa (relative step 2^-8 = 0.4%); a handful of roundings through 4 layers stay
  within a few steps, so 3% of the largest logit catches a wrong adapter, scaling or position (those
  move logits by tens of percent) without failing on rounding.
- Greedy answers are checked token by token against the stock model, teacher-forced: every token the
  fast path picked must be the stock model's argmax given the same prefix, or within that same
  tolerance of it (a near tie that rounding may flip). A token the stock model scores clearly lower
  fails. The share of answers equal to stock `generate` word for word is printed for the record.
- Training: the loss within 1% and each LoRA gradient within 3% (relative L2 norm) of PEFT's, for the
  same reasons (bfloat16 compute, our products summed in another order); dropout is 0 so both draw
  no random masks.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("the GPU check needs CUDA", allow_module_level=True)

from lqmf.core.workspace import Workspace  # noqa: E402
from lqmf.engine import inference  # noqa: E402
from tests.helpers import EXAMPLES, lora_for_training  # noqa: E402

ADAPTERS = {"chat": ("chat_training.csv", "chat", "1"), "instr": ("instructions.jsonl", "instruction_following", "3"),
            "chat2": ("chat_training.csv", "chat", "5")}
PROMPTS = ["How do I return an item?", "Where is my order?", "Translate to French: good morning",
           "Summarize: shipping takes 3 to 5 days.", "What is AI?"]
NEW = 16
STARTED = time.monotonic()
LOGIT_TOL = 0.03
LOSS_TOL, GRAD_TOL = 0.01, 0.03
RECORD: dict[str, list[bool]] = {}  # check -> per answer: its first NEW tokens equal stock generate's


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gpu_workspace(tmp_path_factory) -> Path:
    """A workspace with the 4-bit tiny-ish Llama's three adapters, trained on this GPU."""
    from typer.testing import CliRunner

    from lqmf.cli.app import app
    from lqmf.engine.tiny import build_tiny_causal_lm

    root = tmp_path_factory.mktemp("gpu")
    corpus = [path.read_text(encoding="utf-8") for path in sorted(EXAMPLES.iterdir())]
    base = build_tiny_causal_lm(root / "tiny-llama-256", corpus=corpus, hidden_size=256, layers=4)
    runner = CliRunner()
    for name, (dataset, task, seed) in ADAPTERS.items():
        result = runner.invoke(app, ["--workspace", str(root / "ws"), "train", str(base), str(EXAMPLES / dataset),
                                     task, "--name", name, "--max-steps", "12", "--max-seq-length", "256",
                                     "--batch-size", "4", "--grad-accum", "1", "--lr", "5e-3", "-q", "--4bit",
                                     "--seed", seed])
        assert result.exit_code == 0, result.output
        print(f"[{time.monotonic() - STARTED:6.1f}s] trained {name}")
    return root / "ws"


def _load(ws: Path, fast: bool):
    """The 4-bit base with every adapter resident under its own name (our layer classes when fast)."""
    from lqmf.core.registry import Registry

    previous = os.environ.get("LQMF_FAST")
    os.environ["LQMF_FAST"] = "1" if fast else "0"
    try:
        workspace = Workspace(ws)
        registry = Registry(workspace)
        first = registry.get("chat")
        model = inference.load_for_inference(workspace, None, base=inference.adapter_base(workspace, first),
                                             quantize_4bit=True)
        for name in ADAPTERS:
            inference.attach_adapter(model, registry.get(name).path, name)
    finally:
        if previous is None:
            os.environ.pop("LQMF_FAST")
        else:
            os.environ["LQMF_FAST"] = previous
    assert model.loaded.quantized and model.loaded.device == "cuda"
    return model


@pytest.fixture(scope="module")
def stock(gpu_workspace):
    """Stock PEFT layers and transformers' generate: the reference. Has `chat+instr` as PEFT's `cat` sum."""
    model = _load(gpu_workspace, fast=False)
    model.fast_decode = False
    model.model.add_weighted_adapter(["chat", "instr"], [1.0, 1.0], "chat+instr", combination_type="cat")
    model.model.eval()
    return model


@pytest.fixture(scope="module")
def fast(gpu_workspace):
    model = _load(gpu_workspace, fast=True)
    model.fast_decode = True
    return model


@pytest.fixture(scope="module")
def host(gpu_workspace):
    from lqmf.engine.serve.host import BatchSettings, ModelHost

    host = ModelHost.start(Workspace(gpu_workspace), adapters=list(ADAPTERS), quantize_4bit=True,
                           batching=BatchSettings(max_batch=8, max_queue=64))
    assert host.scheduler is not None and host.model.loaded.quantized
    yield host
    host.close()


# ----------------------------------------------------------------------------- the stock oracle


def stock_logits(stock, slot: str | None, ids: list[int]):
    """The stock model's logits [len(ids), vocab] (float) with adapter slot (None: the bare base)."""
    with inference.adapter_context(stock, slot), torch.inference_mode():
        return stock.model(input_ids=torch.tensor([ids], device="cuda")).logits[0].float()


def stock_answer(stock, slot: str | None, ids: list[int]) -> list[int]:
    """What stock transformers' generate answers (greedy), as token ids."""
    from lqmf.engine.inference import _CallbackStreamer, _hf_generate

    streamer = _CallbackStreamer(stock.tokenizer, None, time.perf_counter(), [], skip_prompt=True)
    with inference.adapter_context(stock, slot):
        return _hf_generate(stock, ids, NEW, 0.0, 1.0, None, 0, streamer, lambda: False)


def assert_follows_stock(stock, slot: str | None, ids: list[int], tokens: list[int], check: str) -> None:
    """Each token of a fast answer is the stock model's greedy pick for its prefix, or within tolerance of it."""
    assert tokens, f"{check}: no tokens"
    logits = stock_logits(stock, slot, ids + tokens)[len(ids) - 1: len(ids) - 1 + len(tokens)]
    picked = logits.gather(1, torch.tensor(tokens, device="cuda").view(-1, 1)).view(-1)
    gap = logits.max(-1).values - picked
    allowed = LOGIT_TOL * logits.abs().max(-1).values
    bad = (gap > allowed).nonzero().view(-1).tolist()
    assert not bad, (f"{check}: token {bad[0]} ({tokens[bad[0]]}) scores {gap[bad[0]]:.4f} below the stock argmax "
                     f"(tolerance {allowed[bad[0]]:.4f})")
    expected = stock_answer(stock, slot, ids)
    common = min(len(expected), len(tokens))  # stock generate gives NEW tokens; a long request more
    RECORD.setdefault(check, []).append(expected[:common] == tokens[:common])


def assert_logits_close(got, expected, check: str) -> None:
    worst = ((got.float() - expected).abs().max(-1).values / expected.abs().max(-1).values).max().item()
    print(f"[{time.monotonic() - STARTED:6.1f}s] {check}: max |fast - stock| / max |stock| = {worst:.5f}")
    assert worst <= LOGIT_TOL, f"{check}: logits differ by {worst:.4f} of the largest (tolerance {LOGIT_TOL})"


# ----------------------------------------------------------------------------- one request at a time


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_single_requests_follow_stock(stock, fast, graphs):
    """`lqmf test`'s path: inference.generate on the batched decoder, a batch of one."""
    from lqmf.engine.decode.batched import BatchedDecoder

    fast.decoder = None  # a fresh decoder, graphs on or off
    inference.generate(fast, inference.prompt_ids(fast, PROMPTS[0]), max_new_tokens=1)
    decoder = fast.decoder
    assert isinstance(decoder, BatchedDecoder) and decoder.slots == 1
    decoder.use_graphs = graphs
    decoder.drop_graphs()
    eos = inference.eos_ids_of(fast)
    answers = set()
    for slot in [*ADAPTERS, None]:
        for prompt in PROMPTS[:3]:
            ids = inference.prompt_ids(fast, prompt)
            with inference.adapter_context(fast, slot):
                streamed = inference.generate(fast, ids, max_new_tokens=NEW, on_text=lambda _: None)
                index = fast.stacked.index(slot) + 1 if slot else 0
                tokens = decoder.generate(ids, NEW, adapter=index, eos_ids=eos).tokens
                with torch.inference_mode():
                    got = decoder.prefill([0], [ids], [0], [index])  # the decoder's own, not PEFT's forward
            assert fast.decoder is decoder and streamed.text == fast.tokenizer.decode(tokens, skip_special_tokens=True)
            assert_follows_stock(stock, slot, ids, tokens, f"single/{'graphs' if graphs else 'eager'}")
            assert_logits_close(got, stock_logits(stock, slot, ids)[-1:], f"single prompt logits ({slot})")
            answers.add((prompt, tuple(tokens)))
    assert len(answers) > 3, "the adapters changed no answer: the check would not see a wrong adapter"
    assert not graphs or decoder.graphs, "no CUDA graph was captured"
    assert graphs or not decoder.graphs


def test_hot_swap_in_place_follows_stock(gpu_workspace, stock):
    """replace_adapter copies chat2 into chat's tensors: the same decoder (its cache kept) now answers as chat2."""
    from lqmf.core.registry import Registry

    model = _load(gpu_workspace, fast=True)
    model.fast_decode = True
    ids = inference.prompt_ids(model, PROMPTS[0])
    with inference.adapter_context(model, "chat"):
        inference.generate(model, ids, max_new_tokens=NEW)
        decoder = model.decoder
        assert decoder.graphs
        assert inference.replace_adapter(model, Registry(Workspace(gpu_workspace)).get("chat2").path, "chat")
        inference.generate(model, ids, max_new_tokens=1)  # reads chat2's weights into the decoder
        tokens = decoder.generate(ids, NEW, adapter=model.stacked.index("chat") + 1,
                                  eos_ids=inference.eos_ids_of(model)).tokens
    assert model.decoder is decoder and decoder.graphs
    assert_follows_stock(stock, "chat2", ids, tokens, "hot-swap in place")


# ----------------------------------------------------------------------------- the batched decoder


def submit(host, model_id: str | None, ids: list[int], new: int = NEW):
    from lqmf.engine.serve.scheduler import BatchRequest

    entry = host._entry_of(model_id)
    return host.scheduler.submit(BatchRequest(ids, new, entry, eos_ids=frozenset(inference.eos_ids_of(host.model))))


def drain(request, timeout: float = 120) -> list[int]:
    tokens, deadline = [], time.monotonic() + timeout
    while True:
        item = request.tokens.get(timeout=max(0.1, deadline - time.monotonic()))
        if item is None:
            return tokens
        if isinstance(item, BaseException):
            raise item
        tokens.append(item)


def _mixed_batch(host, stock, check: str) -> None:
    jobs = [(model_id, prompt) for prompt in PROMPTS for model_id in (*ADAPTERS, None, "chat+instr")]
    ids = {prompt: inference.prompt_ids(host.model, prompt) for prompt in PROMPTS}
    before = host.scheduler.steps_ahead
    requests = [(job, submit(host, job[0], ids[job[1]])) for job in jobs]  # all queued: they batch together
    answers = [(job, drain(request)) for job, request in requests]
    # the stock model runs only now: no CUDA call may come from another thread while the scheduler captures a graph
    for (model_id, prompt), tokens in answers:
        assert_follows_stock(stock, model_id, ids[prompt], tokens, check)
    assert host.scheduler.steps_ahead > before, "greedy rows did not decode ahead"


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_batch_mixing_adapters_base_and_a_sum_follows_stock(host, stock, graphs):
    decoder = host.scheduler.decoder

    def set_graphs() -> None:
        decoder.use_graphs = graphs
        decoder.drop_graphs()

    host.scheduler.call(set_graphs)
    _mixed_batch(host, stock, f"batch/{'graphs' if graphs else 'eager'}")
    assert not graphs or decoder.graphs, "no CUDA graph was captured"


def test_batched_prompt_logits_match_stock(host, stock):
    scheduler = host.scheduler
    for model_id in (*ADAPTERS, None, "chat+instr"):
        entry = host._entry_of(model_id)
        index = scheduler._index[entry.id] if entry is not None else 0
        ids = inference.prompt_ids(host.model, PROMPTS[1])
        slot = scheduler.decoder.slots - 1
        got = scheduler.call(lambda: scheduler.decoder.prefill([slot], [ids], [0], [index]))  # noqa: B023
        assert_logits_close(got, stock_logits(stock, model_id, ids)[-1:], f"batched prefill logits ({model_id})")


def test_hot_swap_during_a_batch_changes_no_request_in_flight(gpu_workspace, stock):
    """Rows keep the adapter they started with while adapters unload and load around them; the adapter
    loaded goes into a free slot of the tables, so the CUDA graphs captured before replay it."""
    from lqmf.engine.serve.host import BatchSettings, ModelHost

    host = ModelHost.start(Workspace(gpu_workspace), adapters=["chat", "instr"], quantize_4bit=True,
                           batching=BatchSettings(max_batch=16))
    try:
        ids = {prompt: inference.prompt_ids(host.model, prompt) for prompt in PROMPTS}
        requests = [((m, p), submit(host, m, ids[p], 120)) for p in PROMPTS[:3] for m in ("chat", "instr", None)]
        deadline = time.monotonic() + 60
        while host.scheduler.load()["running"] < len(requests):
            assert time.monotonic() < deadline
            time.sleep(0.002)
        builds, graphs = host.scheduler.table_builds, set(host.scheduler.decoder.graphs)
        host.unload("instr"), host.load("chat2"), host.switch("chat2")
        # chat2 went into a free slot of the tables in place: no table built, no graph dropped
        assert host.scheduler.table_builds == builds and graphs <= set(host.scheduler.decoder.graphs)
        later = [((m, p), submit(host, m, ids[p])) for p in PROMPTS[:2] for m in ("chat2", "chat")]
        jobs = requests + later
        results: dict = {}
        threads = [threading.Thread(target=lambda i=i, r=r: results.__setitem__(i, drain(r)))
                   for i, (_, r) in enumerate(jobs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        for i, ((model_id, prompt), _) in enumerate(jobs):
            assert_follows_stock(stock, model_id, ids[prompt], results[i], "swap during a batch")
    finally:
        host.close()


# ----------------------------------------------------------------------------- training


def _train_model(gpu_workspace, lean: bool):
    from lqmf.core.models import ModelCatalogue
    from lqmf.engine.loading import load_model
    from lqmf.engine.lora.lean import use_lean_lora

    resolved = ModelCatalogue(Workspace(gpu_workspace)).resolve(str(gpu_workspace.parent / "tiny-llama-256"))
    loaded = load_model(resolved, task="chat", quantize_4bit=True, training=True)
    model = lora_for_training(loaded.model, "all-linear", lean)
    if lean:
        assert use_lean_lora(model), "no LoRA layer of ours"
    return model


def test_training_steps_match_peft(gpu_workspace):
    """Loss and LoRA gradients of our layers against PEFT's, over three steps of AdamW, under the
    bfloat16 autocast that `lqmf train` runs its steps in (fp32 LoRA weights)."""
    from lqmf.engine.train.loop import autocast

    ids = torch.randint(10, 400, (4, 128), generator=torch.Generator().manual_seed(0)).cuda()
    runs = {}
    for lean in (False, True):
        model = _train_model(gpu_workspace, lean)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses, grads = [], []
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            with autocast("cuda"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.item())
            grads.append({n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None})
            optimizer.step()
        runs[lean] = (losses, grads)
        del model, optimizer
        torch.cuda.empty_cache()
    (stock_losses, stock_grads), (our_losses, our_grads) = runs[False], runs[True]
    print(f"training losses: stock {stock_losses}, ours {our_losses}")
    for step, (expected, got) in enumerate(zip(stock_losses, our_losses, strict=True)):
        assert abs(got - expected) <= LOSS_TOL * abs(expected), f"step {step}: loss {got} vs {expected}"
    worst = 0.0
    for step, (expected, got) in enumerate(zip(stock_grads, our_grads, strict=True)):
        assert set(got) == set(expected) and len(got) >= 4 * 7 * 2
        for name, grad in expected.items():
            error = ((got[name] - grad).norm() / grad.norm().clamp_min(1e-12)).item()
            worst = max(worst, error)
            assert error <= GRAD_TOL, f"step {step}: {name} gradient differs by {error:.4f} (relative L2)"
    print(f"training: worst relative gradient difference {worst:.5f}")


def test_zz_record(capsys):
    """Print how many fast answers equal stock generate's word for word (for docs/measurements)."""
    with capsys.disabled():
        for check, same in sorted(RECORD.items()):
            print(f"\n{check}: {sum(same)}/{len(same)} answers equal to stock generate token for token")
