"""Our KTO loss against TRL's formula, and what one thumbs-down batch does to a real (tiny) model."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional


def trl_kto_loss(policy_chosen_logps, policy_rejected_logps, policy_kl_logps, reference_chosen_logps,
                 reference_rejected_logps, reference_kl_logps, beta, desirable_weight, undesirable_weight):
    """TRL 1.16's KTO loss, transcribed from trl/trainer/kto_trainer.py (KTOTrainer.compute_loss,
    loss_type "kto", calculate_KL on, one process: gather_for_metrics is the identity), then losses.nanmean().
    TRL keeps it inside compute_loss (no function to call without a whole trainer), so it is copied here."""
    kl = (policy_kl_logps - reference_kl_logps).mean().detach()
    kl = kl.mean().clamp(min=0)
    if policy_chosen_logps.shape[0] != 0 or reference_chosen_logps.shape[0] != 0:
        chosen_logratios = policy_chosen_logps - reference_chosen_logps
        chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))
    else:
        chosen_losses = torch.Tensor([])
    if policy_rejected_logps.shape[0] != 0 or reference_rejected_logps.shape[0] != 0:
        rejected_logratios = policy_rejected_logps - reference_rejected_logps
        rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))
    else:
        rejected_losses = torch.Tensor([])
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses.nanmean(), kl


@pytest.mark.parametrize("labels", [[True, False, True, False, False], [False, False, False], [True, True]])
@pytest.mark.parametrize(("beta", "weights"), [(0.1, (1.0, 1.0)), (0.5, (1.0, 1.33)), (2.0, (0.7, 1.0))])
def test_kto_loss_equals_trl(labels, beta, weights):
    from lqmf.engine.train.kto import kto_losses

    generator = torch.Generator().manual_seed(len(labels) + int(beta * 10))
    n = len(labels)
    policy, reference = (torch.randn(n, generator=generator, dtype=torch.float64) * 5 - 20 for _ in range(2))
    policy_kl, reference_kl = (torch.randn(n, generator=generator, dtype=torch.float64) * 5 - 30 for _ in range(2))
    policy_kl = policy_kl + 3  # a positive KL estimate, so z0 is not clamped to 0 everywhere
    desirable = torch.tensor(labels)
    ours, kl = kto_losses(policy, reference, desirable, policy_kl, reference_kl, beta=beta,
                          desirable_weight=weights[0], undesirable_weight=weights[1])
    expected, expected_kl = trl_kto_loss(policy[desirable], policy[~desirable], policy_kl, reference[desirable],
                                         reference[~desirable], reference_kl, beta, *weights)
    torch.testing.assert_close(ours.nanmean(), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(kl, expected_kl)


def test_gradients_match_trl():
    from lqmf.engine.train.kto import kto_loss

    policy = torch.tensor([-12.0, -7.5, -20.0], dtype=torch.float64, requires_grad=True)
    reference = torch.tensor([-11.0, -8.0, -19.0], dtype=torch.float64)
    policy_kl = torch.tensor([-25.0, -22.0, -30.0], dtype=torch.float64, requires_grad=True)
    reference_kl = torch.tensor([-26.0, -22.5, -31.0], dtype=torch.float64)
    desirable = torch.tensor([True, False, False])
    (ours,) = torch.autograd.grad(kto_loss(policy, reference, desirable, policy_kl, reference_kl, beta=0.3), policy)
    theirs_policy = policy.detach().clone().requires_grad_(True)
    expected, _ = trl_kto_loss(theirs_policy[desirable], theirs_policy[~desirable], policy_kl, reference[desirable],
                               reference[~desirable], reference_kl, 0.3, 1.0, 1.0)
    (theirs,) = torch.autograd.grad(expected, theirs_policy)
    torch.testing.assert_close(ours, theirs)


def test_a_thumbs_down_batch_lowers_the_rejected_answer(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lqmf.engine import data as data_mod
    from lqmf.engine.train.kto import kto_loss, sequence_logps

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    prompts = ["Where is my order?", "Can I return socks?"]
    rejected = ["Your order was lost forever.", "No returns ever."]

    def batch(answers):
        rows = [data_mod.encode_generative(tokenizer, [{"role": "user", "content": p}, {"role": "assistant",
                                                                                            "content": a}])
                for p, a in zip(prompts, answers, strict=True)]
        return data_mod.collate([{"input_ids": ids, "labels": labels} for ids, labels in rows],
                                tokenizer.pad_token_id, classification=False)

    down, mismatched = batch(rejected), batch(rejected[::-1])  # KL pairs: prompt i with answer i+1
    with torch.no_grad():
        reference = sequence_logps(model, down["input_ids"], down["attention_mask"], down["labels"])
        reference_kl = sequence_logps(model, mismatched["input_ids"], mismatched["attention_mask"],
                                      mismatched["labels"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    desirable = torch.tensor([False, False])
    for _ in range(3):
        policy = sequence_logps(model, down["input_ids"], down["attention_mask"], down["labels"])
        with torch.no_grad():
            policy_kl = sequence_logps(model, mismatched["input_ids"], mismatched["attention_mask"],
                                       mismatched["labels"])
        loss = kto_loss(policy, reference, desirable, policy_kl, reference_kl, beta=0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = sequence_logps(model, down["input_ids"], down["attention_mask"], down["labels"])
    assert (after < reference - 0.1).all(), (reference, after)
