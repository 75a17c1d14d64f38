"""Continuous batching (engine/decode/batched.py, engine/serve/scheduler.py, ModelHost): many requests at once,
each with its own adapter, give what each gives alone; swaps never change a request in flight."""

from __future__ import annotations

import threading
import time

import pytest

from lqmf.core.registry import Registry
from lqmf.core.workspace import Workspace
from lqmf.engine import inference
from lqmf.engine.serve.host import BatchSettings, ModelHost
from tests.helpers import answer_concurrently, rewrite_adapter_weights

PROMPTS = ["How do I return an item?", "Where is my order?", "Translate to French: good morning",
           "Summarize: shipping takes 3 to 5 days.", "What is AI?", "hello"]
NEW = 10


def reference(workspace, adapter: str | None, prompt: str, new: int = NEW, minimum: int = NEW) -> str:
    """What stock PEFT + transformers' generate answer, one request alone (adapter None: the bare base)."""
    ws = Workspace(workspace)
    base = inference.adapter_base(ws, Registry(ws).get("chat-a"))
    model = inference.load_for_inference(ws, adapter, base=base)
    return inference.generate(model, inference.prompt_ids(model, prompt), max_new_tokens=new,
                              min_new_tokens=minimum).text


@pytest.fixture(scope="module")
def host(trained_workspace):
    host = ModelHost.start(Workspace(trained_workspace), adapters=["chat-a", "instr-b"],
                           batching=BatchSettings(max_batch=4, max_queue=64))
    yield host
    host.close()


def ask(host, model_id, prompt, new: int = NEW, **options):
    return host.complete(model_id, prompt, max_new_tokens=new, min_new_tokens=new, **options)[1]


def test_concurrent_mixed_adapters_match_each_alone(host, trained_workspace):
    assert host.scheduler is not None
    jobs = [(model_id, prompt) for prompt in PROMPTS for model_id in ("chat-a", "instr-b", host.base_id)]
    alone = {job: ask(host, *job).text for job in jobs}
    assert answer_concurrently(host, jobs, NEW, NEW) == alone
    assert len({alone[(m, PROMPTS[0])] for m in ("chat-a", "instr-b", host.base_id)}) == 3  # adapters matter
    for model_id, name in (("chat-a", "chat-a"), ("instr-b", "instr-b"), (host.base_id, None)):
        assert alone[(model_id, PROMPTS[0])] == reference(trained_workspace, name, PROMPTS[0])


def test_greedy_rows_decode_ahead_and_match_each_alone(host, trained_workspace):
    """Greedy rows free to end: each step is launched before the tokens of the one before are read back
    (they stay on the device), and every answer is still what it is alone and what stock generate gives."""
    jobs = [(model_id, prompt) for prompt in PROMPTS for model_id in ("chat-a", "instr-b", host.base_id)]
    alone = {job: host.complete(*job, max_new_tokens=40)[1].text for job in jobs}
    before = host.scheduler.steps_ahead
    assert answer_concurrently(host, jobs, 40, 0) == alone
    assert host.scheduler.steps_ahead - before >= 30
    for model_id, name in (("chat-a", "chat-a"), ("instr-b", "instr-b"), (host.base_id, None)):
        assert alone[(model_id, PROMPTS[0])] == reference(trained_workspace, name, PROMPTS[0], 40, 0)


def test_sampled_rows_decode_ahead_and_draw_what_each_draws_alone(host):
    """Seeded sampling rows draw on the device (after a first token drawn on the host), decoding ahead as
    greedy rows do, and each draws the same answer alone and beside the others; another seed, another answer."""
    jobs = [(model_id, prompt) for prompt in PROMPTS[:4] for model_id in ("chat-a", "instr-b", host.base_id)]
    options = {"temperature": 0.9, "top_p": 0.95, "seed": 11}
    alone = {job: host.complete(*job, max_new_tokens=30, **options)[1].text for job in jobs}
    before = host.scheduler.steps_ahead
    assert answer_concurrently(host, jobs, 30, 0, **options) == alone
    assert host.scheduler.steps_ahead - before >= 20
    other = host.complete(*jobs[0], max_new_tokens=30, **{**options, "seed": 12})[1].text
    assert other != alone[jobs[0]]


def test_a_4bit_base_runs_stacked_projections_and_matches_each_alone(trained_workspace):
    """On a 4-bit base, q/k/v and gate/up run as one 4-bit matmul each (bitsandbytes, on the CPU here);
    batched answers are what each gives alone."""
    host = ModelHost.start(Workspace(trained_workspace), adapters=["chat-q"], batching=BatchSettings(max_batch=8))
    try:
        q_proj = host.model.model.model.layers[0].self_attn.q_proj
        group = host.scheduler.decoder.layers[0].groups["q_proj"]
        assert host.model.loaded.quantized and group.base is not getattr(q_proj, "base_layer", q_proj)
        assert group.base.__name__ == "matmul_4bit"
        jobs = [(model_id, prompt) for prompt in PROMPTS for model_id in ("chat-q", host.base_id)]
        alone = {job: host.complete(*job, max_new_tokens=20)[1].text for job in jobs}
        assert answer_concurrently(host, jobs, 20, 0) == alone
        assert len({alone[(m, PROMPTS[0])] for m in ("chat-q", host.base_id)}) == 2
    finally:
        host.close()


def test_no_request_starves_under_a_steady_stream(host):
    """Six threads keep 4 slots busy; requests asked meanwhile (one long) are each served in arrival order."""
    stop = threading.Event()
    served: list[float] = []

    def hammer(index: int) -> None:
        while not stop.is_set():
            ask(host, ("chat-a", "instr-b")[index % 2], PROMPTS[index % len(PROMPTS)])
            served.append(time.monotonic())

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        started = time.monotonic()
        long = host.complete("instr-b", PROMPTS[0], max_new_tokens=60, min_new_tokens=60)[1]
        short = ask(host, "chat-a", PROMPTS[1])
        finished = time.monotonic()
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert (long.new_tokens, long.finish_reason, short.new_tokens) == (60, "length", NEW)
    assert sum(started < t < finished for t in served) >= 6  # the stream kept flowing meanwhile
    assert host.scheduler.load()["running"] == 0


@pytest.mark.parametrize("minimum", [300, 0], ids=["picked-on-host", "decoded-ahead"])
def test_swaps_during_batched_load_never_change_a_request_in_flight(trained_workspace, minimum):
    host = ModelHost.start(Workspace(trained_workspace), adapters=["chat-a", "instr-b"],
                           batching=BatchSettings(max_batch=4))
    long = 300
    try:
        alone = {name: host.complete(name, PROMPTS[0], max_new_tokens=long, min_new_tokens=minimum)[1].text
                 for name in ("chat-a", "instr-b")}
        results: list[tuple[str | None, str]] = []
        errors: list[BaseException] = []

        def run(model_id: str) -> None:
            try:
                adapter, generation = host.complete(model_id, PROMPTS[0], max_new_tokens=long, min_new_tokens=minimum)
                results.append((adapter, generation.text))
            except BaseException as err:  # noqa: BLE001 - asserted below
                errors.append(err)

        threads = [threading.Thread(target=run, args=(m,)) for m in ("default", "chat-a", "instr-b", "default")]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while host.scheduler.load()["running"] + len(results) < 4:  # every request in (a free instr-b may be done)
            assert time.monotonic() < deadline
            time.sleep(0.005)
        swaps = [host.switch("instr-b"), host.unload("chat-a"), host.unload("instr-b"), host.load("chat-a")]
        kept = len(host.scheduler.entries)  # both unloaded adapters' weights, while their rows run
        running = host.scheduler.load()["running"]
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        assert sorted(results) == sorted([("chat-a", alone["chat-a"])] * 3 + [("instr-b", alone["instr-b"])])
        assert [s.method for s in swaps] == ["resident", "unload", "unload", "load"]
        assert running == 0 or kept >= (3 if minimum else 2)  # a free instr-b row may have ended already
        again = host.complete("chat-a", PROMPTS[0], max_new_tokens=long, min_new_tokens=minimum)[1].text
        assert host.resident.keys() == {"chat-a"} and again == alone["chat-a"]
        assert len(host.scheduler.entries) == 1  # the unloaded adapters' weights went with their last request
    finally:
        host.close()


def test_least_recently_used_adapter_is_evicted_and_reported(trained_workspace):
    host = ModelHost.start(Workspace(trained_workspace), adapters=["chat-a", "instr-b"],
                           batching=BatchSettings(max_batch=2, max_adapters=2))
    try:
        ask(host, "chat-a", PROMPTS[0])  # instr-b is now the least recently used
        result = host.switch("chat-q")
        assert (result.method, result.active, result.evicted) == ("load", "chat-q", ["instr-b"])
        assert host.describe()["evictions"][-1]["adapter"] == "instr-b"
        # a request naming a registered adapter that is not resident loads it instead of a 404
        assert ask(host, "instr-b", PROMPTS[0]).text
        assert set(host.resident) == {"chat-q", "instr-b"}
        assert host.evictions[-1]["adapter"] == "chat-a"
    finally:
        host.close()


def test_full_queue_is_refused_and_a_cancelled_request_frees_its_row(trained_workspace):
    from lqmf.engine.serve.scheduler import Busy

    host = ModelHost.start(Workspace(trained_workspace), adapters=["chat-a"],
                           batching=BatchSettings(max_batch=1, max_queue=1))
    try:
        leave = threading.Event()
        started = threading.Event()
        outcomes: dict = {}

        def long_request() -> None:
            outcomes["long"] = host.complete("chat-a", PROMPTS[0], max_new_tokens=200, min_new_tokens=200,
                                             on_text=lambda _: started.set(), cancelled=leave.is_set)[1]

        def waiting_request() -> None:
            outcomes["waiting"] = ask(host, "chat-a", PROMPTS[1])

        runner = threading.Thread(target=long_request)
        runner.start()
        assert started.wait(60)
        waiter = threading.Thread(target=waiting_request)
        waiter.start()
        deadline = time.monotonic() + 30
        while host.scheduler.load()["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(Busy) as busy:
            ask(host, "chat-a", PROMPTS[2])
        assert busy.value.retry_after >= 1
        leave.set()  # the client hangs up: its row goes at the next token, the waiting request gets it
        runner.join(60)
        waiter.join(60)
        assert outcomes["long"].finish_reason == "cancelled" and outcomes["long"].new_tokens < 200
        assert outcomes["waiting"].new_tokens == NEW
        assert {k: host.scheduler.load()[k] for k in ("running", "waiting")} == {"running": 0, "waiting": 0}
    finally:
        host.close()


def test_lqmf_fast_0_serves_with_stock_peft_and_generate_alike(trained_workspace, host, monkeypatch):
    monkeypatch.setenv("LQMF_FAST", "0")
    stock = ModelHost.start(Workspace(trained_workspace), adapters=["chat-a", "instr-b"])
    assert stock.scheduler is None and stock.model.decoder is None
    for model_id in ("chat-a", "instr-b", "default", host.base_id):
        for prompt in PROMPTS[:3]:
            assert ask(stock, model_id, prompt).text == ask(host, model_id, prompt).text, (model_id, prompt)


def test_full_server_answers_429_with_retry_after(trained_workspace):
    from fastapi.testclient import TestClient

    from lqmf.engine.serve.server import create_app

    host = ModelHost.start(Workspace(trained_workspace), adapters=["chat-a"],
                           batching=BatchSettings(max_batch=1, max_queue=1))
    body = {"model": "chat-a", "prompt": PROMPTS[0], "max_tokens": 200, "min_tokens": 200}
    try:
        with TestClient(create_app(host)) as http:
            answers: list = []
            threads = [threading.Thread(target=lambda: answers.append(http.post("/v1/completions", json=body)))
                       for _ in range(2)]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 60
            while sum(host.scheduler.load()[k] for k in ("running", "waiting")) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused = http.post("/v1/completions", json=body)
            for thread in threads:
                thread.join(120)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "server_busy"
        assert [a.status_code for a in answers] == [200, 200]
        assert all(a.json()["usage"]["completion_tokens"] == 200 for a in answers)
    finally:
        host.close()


def test_a_client_that_hangs_up_frees_its_row(adapters_workspace):
    """A real `lqmf serve`: a streaming client leaves after a few chunks of a 900-token answer; its row
    leaves the batch at once instead of generating the rest."""
    import httpx

    from tests.helpers import running_server

    body = {"model": "chat-a", "prompt": PROMPTS[0], "max_tokens": 900, "min_tokens": 900, "stream": True}
    with running_server(adapters_workspace, "--adapter", "chat-a", "--max-new-tokens", "900") as server:
        def state() -> dict:
            return httpx.get(server.url + "/health", timeout=30).json()["batching"]

        before = state()["tokens_generated"]
        with httpx.Client(timeout=60) as http, http.stream("POST", server.url + "/v1/completions",
                                                           json=body) as response:
            chunks = (line for line in response.iter_lines() if line.startswith("data: "))
            assert len([next(chunks) for _ in range(3)]) == 3
        deadline = time.monotonic() + 30
        while state()["running"]:
            assert time.monotonic() < deadline, "the row of a client that left is still generating"
            time.sleep(0.05)
        assert state()["tokens_generated"] - before < 900


def test_prompts_read_together_give_what_each_gives_alone(host):
    """One prefill pass over rows of different lengths, adapters and starts (padding included) leaves the
    logits and KV cache of each row read alone (to float32 rounding)."""
    import torch

    decoder = host.scheduler.decoder
    chunks, starts, adapters = [[5, 9, 13, 2, 7], [11, 3], [4, 4, 8, 1]], [0, 0, 3], [1, 2, 0]

    def cache(slot: int, length: int):
        return [t[slot, :, :length].clone() for t in (*decoder.keys, *decoder.values)]

    alone, cached = [], []
    with torch.inference_mode():
        host.scheduler.call(lambda: None)  # the loop is idle between turns
        decoder.prefill([1], [[6, 6, 6]], [0], [0])  # the third row (slot 1) continues its prompt at position 3
        for index, chunk in enumerate(chunks):
            alone.append(decoder.prefill([3 - index], [chunk], [starts[index]], [adapters[index]])[0])
            cached.append(cache(3 - index, starts[index] + len(chunk)))
        together = decoder.prefill([3, 2, 1], chunks, starts, adapters)
    for index, chunk in enumerate(chunks):  # matrix products of more rows may round the last bit differently
        torch.testing.assert_close(together[index], alone[index], rtol=0, atol=1e-5)
        assert together[index].argmax() == alone[index].argmax()
        for got, expected in zip(cache(3 - index, starts[index] + len(chunk)), cached[index], strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_captured_prefill_pass_reads_padded_inputs_as_the_eager_pass_reads_the_prompts(host):
    """The pass a CUDA graph captures for first chunks (here run eagerly on the CPU) takes its rows padded to a
    rows bucket and a length bucket in one input tensor: it leaves each real row's logits and KV cache as the
    eager pass does, and padding rows write only the idle position."""
    import torch

    from lqmf.engine.decode.batched import PREFILL_LENGTHS

    decoder = host.scheduler.decoder
    slots, adapters = [2, 0, 3], [1, 2, 0]
    chunks = [[5, 9, 13, 2, 7], [11, 3], [4, 4, 8, 1, 6, 6, 2, 9, 1, 1, 3, 5, 7, 8, 2, 20, 21]]

    def cache(slot: int, length: int):
        return [t[slot, :, :length].clone() for t in (*decoder.keys, *decoder.values)]

    key = decoder._prefill_key(len(chunks), max(map(len, chunks)))
    assert key == (4, 32) and 17 > PREFILL_LENGTHS[0]  # 3 rows -> 4, 17 tokens -> 32
    assert decoder._prefill_key(1, 17) == (1, 32) and decoder._prefill_key(1, 300) is None  # longer: eager
    assert decoder._prefill_key(32, 17) is None  # 32 x 32 padded tokens: past PREFILL_GRAPH_TOKENS
    with torch.inference_mode():
        host.scheduler.call(lambda: None)  # the loop is idle between turns
        for slot in slots:
            decoder.clear_slot(slot)
        eager = decoder.prefill(slots, chunks, [0, 0, 0], adapters)
        expected = [cache(slot, len(chunk)) for slot, chunk in zip(slots, chunks, strict=True)]
        untouched = cache(1, 32)
        for slot in slots:
            decoder.clear_slot(slot)
        inputs = decoder._prefill_inputs(*key, slots, chunks, [0, 0, 0], adapters)
        captured = decoder._prefill_pass(inputs.to(decoder.device), key[1], key[1])
    assert captured.shape[0] == 4
    torch.testing.assert_close(captured[:3].float(), eager, rtol=0, atol=1e-5)
    for slot, chunk, cached in zip(slots, chunks, expected, strict=True):
        for got, want in zip(cache(slot, len(chunk)), cached, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert all(torch.equal(got, want) for got, want in zip(cache(1, 32), untouched, strict=True))


def test_a_prefill_pass_that_would_replay_a_graph_is_never_grown_into_an_eager_one(host, monkeypatch):
    """32 fresh 17-token prompts arriving together go in two graphed passes of 16 (16 x 32 padded tokens
    each) rather than one eager pass of 32 (a graph replays in milliseconds, an eager pass launches
    hundreds of kernels); passes that run eagerly anyway (continuations, long prompts) only keep to the
    token budget, and the oldest row always goes."""
    from lqmf.core.memory_plan import PREFILL_GRAPH_TOKENS
    from lqmf.engine.decode.batched import BATCH_BUCKETS, PREFILL_LENGTHS, bucket
    from lqmf.engine.serve.scheduler import prefill_group

    def replays(rows: int, tokens: int) -> bool:  # the decoder's rule on a CUDA device with 32 slots
        length = next((size for size in PREFILL_LENGTHS if size >= tokens), None)
        return bool(length) and bucket(rows, BATCH_BUCKETS) * length <= PREFILL_GRAPH_TOKENS

    fresh = [(17, True)] * 32
    assert prefill_group(fresh, 512, replays) == 16
    assert prefill_group(fresh, 512, lambda rows, tokens: False) == 30  # eager: 30 x 17 tokens <= 512
    assert prefill_group([(17, False)] * 32, 512, replays) == 30  # continuations never replay a graph
    assert prefill_group([(300, True), (17, True), (17, True)], 512, replays) == 1  # 2 x 300 > 512
    assert prefill_group([(17, True), (300, True)], 512, replays) == 1  # would leave the graph
    assert prefill_group([(17, False), (17, True)], 512, replays) == 2  # eager either way
    assert prefill_group([(600, True)], 512, replays) == 1

    decoder = host.scheduler.decoder
    monkeypatch.setattr(decoder, "graph_prefills", True)  # as on a CUDA device
    assert decoder.prefill_replays(4, 17) and not decoder.prefill_replays(1, 300)
    monkeypatch.setattr(decoder, "prefill_failed", {(4, 32)})  # a capture that failed runs eagerly from then on
    assert not decoder.prefill_replays(3, 17) and decoder.prefill_replays(2, 17)


def test_the_graphs_captured_at_start_cover_every_shape_a_request_can_meet(host, monkeypatch):
    """graph_keys (what `lqmf serve` captures before its first request on a GPU) holds the step of every
    row count and cached length, greedy and sampling, and every first-chunk pass that replays a graph,
    and nothing else; on the CPU nothing is captured."""
    from lqmf.core.memory_plan import PREFILL_GRAPH_KEYS

    decoder = host.scheduler.decoder
    monkeypatch.setattr(decoder, "graph_prefills", True)  # as on a CUDA device
    steps, prefills = decoder.graph_keys()
    met = {(*decoder.step_shape(rows, keys), sampling) for rows in range(1, decoder.slots + 1)
           for keys in range(1, decoder.max_len + 1) for sampling in (False, True)}
    assert set(steps) == met and len(steps) == len(met)
    replayed = {decoder._prefill_key(rows, tokens) for rows in range(1, decoder.slots + 1)
                for tokens in range(1, PREFILL_GRAPH_KEYS + 1) if decoder.prefill_replays(rows, tokens)}
    assert set(prefills) == replayed and (4, 32) in replayed
    assert host.capture_graphs() == 0 and not host.captures_graphs


def test_the_loop_reports_where_its_time_went(host):
    """batching.loop in /health: one request adds a prefill pass of one row and NEW - 1 decode steps'
    launches (the prompt's pass picks the first token), and the clocks only grow; busy_s, counted at
    the end of each turn of the loop, comes to hold every section."""
    before, admitted = host.scheduler.load(), host.scheduler.times.admit_s
    ask(host, "chat-a", "Where is my order?")
    assert host.scheduler.times.admit_s > admitted  # (load() rounds to 0.1 ms; one admission takes less)
    for _ in range(200):  # the turn that handed out the last token may still be ending
        after = host.scheduler.load()
        grown = {key: after["loop"][key] - before["loop"][key] for key in before["loop"]}
        sections = sum(grown[key] for key in ("prefill_s", "launch_s", "wait_s", "emit_s", "admit_s"))
        if grown["busy_s"] >= sections - 1e-3:
            break
        time.sleep(0.01)
    assert after["loop"]["prefill_passes"] - before["loop"]["prefill_passes"] == 1
    assert after["loop"]["prefill_rows"] - before["loop"]["prefill_rows"] == 1
    assert after["steps"] - before["steps"] >= NEW - 1
    assert all(after["loop"][key] >= before["loop"][key] for key in before["loop"])
    assert after["loop"]["launch_s"] > before["loop"]["launch_s"] and after["loop"]["prefill_s"] > 0
    assert grown["busy_s"] >= sections - 1e-3


def test_an_answer_sent_whole_gets_its_tokens_in_one_hand_over_when_its_row_ends(host):
    """each_token False (an answer sent whole, no stop strings): the tokens a row handed out one by one
    gets, as one list when the row ends, and the time its first token was picked."""
    from lqmf.engine.serve.scheduler import BatchRequest

    ids = inference.prompt_ids(host.model, PROMPTS[0])
    one_by_one = host.scheduler.submit(BatchRequest(ids, 6))
    whole = host.scheduler.submit(BatchRequest(ids, 6, each_token=False))
    tokens = list(iter(one_by_one.tokens.get, None))
    assert len(tokens) == 6 and list(iter(whole.tokens.get, None)) == [tokens]
    assert whole.submitted < whole.first_token_at


def test_rows_below_min_new_tokens_never_end_early(host):
    """A greedy row below its min_new_tokens never picks an end-of-text token, batched with other rows."""
    from lqmf.engine.serve.scheduler import BatchRequest

    ids = inference.prompt_ids(host.model, PROMPTS[0])

    def run(eos: frozenset[int], minimum: int) -> list[list[int]]:
        requests = [host.scheduler.submit(BatchRequest(ids, 6, min_new_tokens=minimum, eos_ids=eos))
                    for _ in range(3)]
        return [list(iter(request.tokens.get, None)) for request in requests]

    before = host.scheduler.steps_ahead
    free = run(frozenset(), 0)[0]
    ending = frozenset({free[2]})  # greedy decoding picks this third: make it end the text
    assert all(tokens == free[:3] for tokens in run(ending, 0))
    for tokens in run(ending, 6):
        assert len(tokens) == 6 and free[2] not in tokens and tokens[:2] == free[:2]
    assert host.scheduler.steps_ahead - before >= 9  # barred on the device, decoded ahead


def test_no_step_runs_past_a_rows_last_token(host):
    """A row of n new tokens takes n - 1 decode steps (its first token is the prompt pass's): decoding
    ahead never launches a step for a row whose last token a step in flight already picks."""
    steps = host.scheduler.steps
    generation = ask(host, host.base_id, PROMPTS[3], new=NEW)
    assert generation.new_tokens == NEW and host.scheduler.steps - steps == NEW - 1


def test_adapters_load_into_free_slots_without_building_the_tables_again(trained_workspace, monkeypatch):
    """Once the adapter tables exist, loading an adapter writes it into a free slot in place and unloading
    one frees its slot for the next: the tables are not built again and the captured graphs, which read
    them, are kept. Answers stay what stock PEFT gives."""
    host = ModelHost.start(Workspace(trained_workspace), adapters=["chat-a"],
                           batching=BatchSettings(max_batch=4, max_adapters=4))
    try:
        scheduler = host.scheduler
        dropped = []
        monkeypatch.setattr(scheduler.decoder, "drop_graphs", lambda: dropped.append(1))
        builds = scheduler.table_builds
        host.load("instr-b", activate=False)
        assert ask(host, "instr-b", PROMPTS[0]).text == reference(trained_workspace, "instr-b", PROMPTS[0])
        host.unload("chat-a")
        assert list(scheduler._index.values()) == [2]  # chat-a's slot is free once no request uses it
        host.load("chat-a")
        assert sorted(scheduler._index.values()) == [1, 2]
        assert ask(host, "chat-a", PROMPTS[0]).text == reference(trained_workspace, "chat-a", PROMPTS[0])
        assert (scheduler.table_builds, dropped) == (builds, [])
        memory = host.describe()["batching"]
        assert memory["adapter_table_builds"] == builds
        # the memory plan counted the tables of the adapters given at start (their rank and projections)
        assert memory["adapter_tables_gb"] == memory["adapter_plan_gb"] > 0
    finally:
        host.close()


def _perturbed_copies(trained_workspace, folder, count: int) -> list[str]:
    """NAME=PATH specs of count copies of chat-a, each with its own random lora_B (answers that differ) and
    its manifest's record of the weights' file to match."""
    import shutil

    import torch

    specs = []
    for number in range(count):
        target = folder / f"many-{number}"
        shutil.copytree(trained_workspace / "adapters" / "chat-a", target)
        generator = torch.Generator().manual_seed(number)

        def randomize(state: dict, generator=generator) -> None:
            for key, tensor in state.items():
                if "lora_B" in key:
                    state[key] = torch.randn(tensor.shape, generator=generator).to(tensor.dtype) * 0.5

        rewrite_adapter_weights(target, randomize)
        specs.append(f"many-{number}={target}")
    return specs


def test_64_adapters_resident_answer_16_clients_each_on_its_own(trained_workspace, tmp_path):
    """64 adapters resident at once in tables built once; 16 concurrent requests, each on a different
    adapter, get what each gets alone, and what a server holding only that adapter gives."""
    specs = _perturbed_copies(trained_workspace, tmp_path, 64)
    host = ModelHost.start(Workspace(trained_workspace), adapters=specs,
                           batching=BatchSettings(max_batch=16, max_adapters=64, max_queue=64))
    try:
        assert len(host.resident) == 64 and host.scheduler.table_builds == 1
        jobs = [(f"many-{4 * i + 3}", PROMPTS[i % len(PROMPTS)]) for i in range(16)]
        alone = {job: ask(host, *job).text for job in jobs}
        assert answer_concurrently(host, jobs, NEW, NEW) == alone
        assert len({alone[(f"many-{4 * i + 3}", PROMPTS[0])] for i in (0, 6, 12)}) == 3  # the adapters matter
    finally:
        host.close()
    for job in (jobs[0], jobs[-1]):  # slots 4 and 64
        single = ModelHost.start(Workspace(trained_workspace), adapters=[specs[int(job[0].split("-")[1])]],
                                 batching=BatchSettings(max_batch=2))
        try:
            assert ask(single, *job).text == alone[job]
        finally:
            single.close()


def test_tables_grown_for_a_combination_shrink_back_once_it_is_gone(trained_workspace, caplog):
    """A combination A+B has the rank of both: the tables are built larger than the memory plan set aside
    (and the log says so); once the combination is gone they are built back to the plan's size, and the
    adapters still answer as stock PEFT does."""
    import logging

    host = ModelHost.start(Workspace(trained_workspace), adapters=["chat-a", "instr-b"],
                           batching=BatchSettings(max_batch=2, max_adapters=2))
    try:
        scheduler = host.scheduler
        planned = scheduler.memory()["adapter_plan_gb"]
        assert scheduler.memory()["adapter_tables_gb"] == planned
        with caplog.at_level(logging.WARNING, logger="lqmf.serve"):
            assert ask(host, "chat-a+instr-b", PROMPTS[0]).text
        assert scheduler.memory()["adapter_tables_gb"] > planned and "more than the" in caplog.text
        host.combinations._free("chat-a+instr-b")  # as the combinations' cache frees its least recently used
        assert scheduler.memory()["adapter_tables_gb"] == planned
        assert ask(host, "instr-b", PROMPTS[0]).text == reference(trained_workspace, "instr-b", PROMPTS[0])
    finally:
        host.close()
