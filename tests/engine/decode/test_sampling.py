"""Sampling on the device (engine/decode/sampling.py: gumbel_noise, sample_rows) and through the batched
decoder's step and the scheduler: the draws follow softmax(logits / temperature) within the nucleus,
and a seeded row draws the same tokens whatever else is in the batch."""

from __future__ import annotations

import pytest

from lqmf.engine.decode.sampling import gumbel_noise, sample_rows

torch = pytest.importorskip("torch")


def test_noise_depends_on_seed_position_and_token_alone():
    seeds, positions = torch.tensor([5, -3, 2**62 + 7, 5]), torch.tensor([7, 7, 0, 8])
    noise = gumbel_noise(seeds, positions, 50)
    assert noise.shape == (4, 50) and bool(torch.isfinite(noise).all())
    torch.testing.assert_close(gumbel_noise(seeds[:1], positions[:1], 50), noise[:1], rtol=0, atol=0)  # alone
    assert not torch.equal(noise[0], noise[3]) and not torch.equal(noise[0], noise[1])  # position, seed
    many = gumbel_noise(torch.arange(4000), torch.zeros(4000, dtype=torch.long), 8).flatten()
    assert abs(float(many.mean()) - 0.5772) < 0.03 and abs(float(many.std()) - 1.2825) < 0.03  # Gumbel(0, 1)


def test_draws_follow_the_tempered_softmax_within_the_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")])
    draws = 20000
    rows = logits.expand(draws, -1)
    seeds, positions = torch.arange(draws), torch.full((draws,), 3)
    for temperature, top_p in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.7)):
        tokens = sample_rows(rows, torch.full((draws,), temperature, dtype=torch.float64),
                             torch.full((draws,), top_p, dtype=torch.float64), seeds, positions)
        seen = torch.bincount(tokens, minlength=6).double() / draws
        expected = torch.softmax(logits.double() / temperature, -1)
        if top_p < 1:  # the largest probabilities whose sum before each is below top_p: tokens 0 and 1 here
            assert float(expected[0]) < top_p < float(expected[:2].sum())
            expected = torch.cat([expected[:2] / expected[:2].sum(), torch.zeros(4, dtype=torch.float64)])
        assert float((seen - expected).abs().max()) < 0.015, (temperature, top_p, seen, expected)
        assert seen[5] == 0  # a barred id (-inf) is never drawn


def test_a_sampled_row_draws_the_same_alone_and_in_a_batch(tiny_model):
    """The decoder's step: a sampling row's token depends on its seed and position, not on the batch;
    greedy rows beside it keep their argmax."""
    from lqmf.core.models import ModelCatalogue
    from lqmf.core.workspace import Workspace
    from lqmf.engine.decode.batched import BatchedDecoder
    from lqmf.engine.loading import load_model

    resolved = ModelCatalogue(Workspace(tiny_model.parent / "ws")).resolve(str(tiny_model))
    model = load_model(resolved, task="chat", quantize_4bit=False).model
    decoder = BatchedDecoder(model, slots=4, max_len=64)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]
    with torch.inference_mode():
        decoder.prefill(list(range(4)), prompts, [0] * 4, [0] * 4)
        tokens, positions = [3, 4, 5, 6], [len(p) for p in prompts]
        draw = (1.0, 0.9, 1234)
        together = decoder.decode(tokens, positions, [0] * 4, sampling=[None, draw, None, draw]).greedy()
        greedy = decoder.decode(tokens, positions, [0] * 4).greedy()
        alone = decoder.decode(tokens[1:2], positions[1:2], [0], sampling=[draw]).greedy()
        others = [decoder.decode(tokens, positions, [0] * 4, sampling=[None, (1.0, 0.9, seed), None, None])
                  .greedy()[1] for seed in range(12)]
    assert together[0] == greedy[0] and together[2] == greedy[2]
    assert together[1] == alone[0]
    assert len(set(others)) > 1  # the seed matters
