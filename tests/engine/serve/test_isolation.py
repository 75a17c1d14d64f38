"""A request or an adapter can fail only itself (issue 20): in the batching host, a poisoned adapter's
NaN never reaches another row, and whatever raises while a row is set up or sampled ends that
request alone and frees its row."""

from __future__ import annotations

import threading

import pytest

from lqmf.core.errors import InputError
from lqmf.core.workspace import Workspace
from lqmf.engine.serve.host import BatchSettings, ModelHost
from tests.helpers import answer_concurrently

PROMPTS = ["How do I return an item?", "Where is my order?", "hello"]
NEW = 8


@pytest.fixture(scope="module")
def host(trained_workspace):
    host = ModelHost.start(Workspace(trained_workspace), adapters=["chat-a", "instr-b"],
                           batching=BatchSettings(max_batch=4, max_queue=16))
    yield host
    host.close()


def answers(host, jobs) -> dict:
    """Each (model id, prompt) answered greedily, all at once from threads."""
    return answer_concurrently(host, jobs, NEW, NEW)


def idle(host) -> bool:
    load = host.scheduler.load()
    return load["running"] == 0 and load["waiting"] == 0


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1e39", "1000"])
def test_a_non_finite_or_huge_combination_weight_is_refused_and_harms_nobody(host, weight):
    jobs = [(m, p) for p in PROMPTS for m in ("chat-a", "instr-b", host.base_id)]
    alone = answers(host, jobs)
    with pytest.raises(InputError, match="not a finite number between"):
        host.complete(f"chat-a:{weight}+instr-b:1", "hello", max_new_tokens=NEW)
    assert answers(host, jobs) == alone
    assert host.complete("chat-a:0.5+instr-b:0.5", "hello", max_new_tokens=NEW)[1].new_tokens == NEW


def test_a_poisoned_adapter_never_reaches_other_rows(host):
    """An entry whose lora_A holds NaN (what a corrupt file or an overflowing combination would make, were
    they not refused at load) answers garbage for itself only: rows select their own columns, they are
    not masked with zeros (0 x NaN is NaN)."""
    jobs = [(m, p) for p in PROMPTS for m in ("chat-a", "instr-b", host.base_id)]
    alone = answers(host, jobs)
    source = host.resident["chat-a"].entry.weights
    poisoned = {name: (a.clone().fill_(float("nan")), b.clone(), scaling) for name, (a, b, scaling) in source.items()}
    entry = host.scheduler.add_adapter("poison", None, weights=lambda: poisoned)
    try:
        from lqmf.engine import inference

        ids = inference.prompt_ids(host.model, PROMPTS[0])
        together: dict = {}

        def poisoned_request():
            together["poison"] = inference.generate_batched(host.model, host.scheduler, ids, entry=entry,
                                                            max_new_tokens=NEW, min_new_tokens=NEW)

        thread = threading.Thread(target=poisoned_request)
        thread.start()
        assert answers(host, jobs) == alone
        thread.join(120)
        assert together["poison"].new_tokens == NEW  # it answers (nonsense), and alone suffers
    finally:
        host.scheduler.retire(entry)
    assert answers(host, jobs) == alone


@pytest.mark.parametrize("options", [{"seed": 2**64, "temperature": 0.7}, {"seed": -1, "temperature": 0.7},
                                     {"temperature": float("inf")}, {"temperature": 0.7, "top_p": float("nan")}],
                         ids=["seed-2**64", "seed-negative", "temperature-inf", "top-p-nan"])
def test_a_request_that_fails_in_the_loop_ends_alone_and_frees_its_row(host, options):
    """Past the HTTP edge (a Python caller): a seed torch cannot take fails the row's set-up, an infinite
    temperature its sampling; that request gets its error, the others their answers, and no row stays held."""
    jobs = [(m, p) for p in PROMPTS for m in ("chat-a", host.base_id)]
    alone = answers(host, jobs)
    failures = []

    def bad():
        try:
            host.complete("instr-b", "hello", max_new_tokens=NEW, **options)
        except Exception as err:  # noqa: BLE001 - what the request got
            failures.append(err)

    threads = [threading.Thread(target=bad) for _ in range(6)]  # more than the 4 rows: leaks would wedge
    for thread in threads:
        thread.start()
    together = answers(host, jobs)
    for thread in threads:
        thread.join(120)
    assert together == alone
    assert idle(host)
    if options.get("seed", 0) >= 2**64:  # torch takes a negative seed (it wraps); a 65-bit one it refuses
        assert len(failures) == 6 and all("Overflow" in str(err) for err in failures), failures
    assert answers(host, jobs) == alone  # every row was freed: nothing is refused or stuck
