"""Our KTO loss against TRL's own KTOTrainer on one real batch (TRL has no standalone KTO loss: it lives in
KTOTrainer.compute_loss), and what one thumbs-down batch does to a real (tiny) model."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

ROWS = [("Where is my order?", "It ships tomorrow."), ("Can I return socks?", "No returns ever."),
        ("What sizes do you have?", "Small, medium and large."), ("Is shipping free?", "Only on Mondays, maybe.")]
# float32 on the CPU: TRL sums log-probabilities from its fused LM head (tiled), we from full logits,
# so the two differ by rounding only (measured: at most 8.4e-7 on the loss, 2.4e-6 on a gradient).
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
GRADIENT_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # the largest gradient is about 0.4


def trl_kto_trainer(tiny_model, output_dir, labels, beta, weights):
    """TRL's KTOTrainer, loss_type "kto", on a policy that differs from its reference (the tiny model),
    with one batch of len(labels) rows: CPU, float32, nothing reported or pushed."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a reference away from the policy, so the log-ratios and z0 are not 0
        for parameter in reference.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    rows = [{"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": answer}],
             "label": label} for (prompt, answer), label in zip(ROWS[: len(labels)], labels, strict=True)]
    config = KTOConfig(output_dir=str(output_dir), loss_type="kto", beta=beta, desirable_weight=weights[0],
                       undesirable_weight=weights[1], per_device_train_batch_size=len(rows), max_length=None,
                       use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True,
                       push_to_hub=False)
    trainer = KTOTrainer(model=policy, ref_model=reference, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    return trainer, reference, tokenizer


def our_kto_loss(policy, reference, batch, beta, weights):
    """Our loss from our log-probabilities of TRL's batch: (loss, z0). The policy's KL log-probabilities keep
    their graph, so a z0 that is not detached would show in the gradients."""
    from lqmf.engine.data import IGNORE_INDEX
    from lqmf.engine.train.kto import kto_losses, sequence_logps

    def logps(model, prefix):
        labels = batch[f"{prefix}input_ids"].masked_fill(batch[f"{prefix}completion_mask"] == 0, IGNORE_INDEX)
        return sequence_logps(model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], labels)

    with torch.no_grad():
        reference_logps, reference_kl = logps(reference, ""), logps(reference, "KL_")
    losses, kl = kto_losses(logps(policy, ""), reference_logps, batch["label"], logps(policy, "KL_"), reference_kl,
                            beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1])
    return losses.nanmean(), kl


@pytest.mark.parametrize(("labels", "beta", "weights"), [
    ([True, False, True, False], 0.1, (1.0, 1.0)),  # what `lqmf learn` uses
    ([False, False, False], 0.5, (1.0, 1.33)),
    ([True, True], 2.0, (0.7, 1.0)),
])
def test_kto_loss_equals_trl_kto_trainer(tiny_model, tmp_path, labels, beta, weights):
    from lqmf.engine import data as data_mod

    trainer, reference, tokenizer = trl_kto_trainer(tiny_model, tmp_path, labels, beta, weights)
    batch = next(iter(trainer.get_train_dataloader()))
    # our encoding of each conversation is TRL's: same tokens, same answer tokens
    for i, (prompt, answer) in enumerate(ROWS[: len(labels)]):
        ids, answer_labels = data_mod.encode_generative(tokenizer, [{"role": "user", "content": prompt},
                                                                    {"role": "assistant", "content": answer}])
        assert batch["input_ids"][i, : len(ids)].tolist() == ids
        assert batch["completion_mask"][i].tolist() == [int(label != data_mod.IGNORE_INDEX) for label in answer_labels
                                                        ] + [0] * (batch["input_ids"].shape[1] - len(ids))
    policy = trainer.model
    with pytest.warns(FutureWarning, match="return_outputs"):
        theirs, _ = trainer.compute_loss(policy, batch, return_outputs=True)
    ours, kl = our_kto_loss(policy, reference, batch, beta, weights)
    assert kl > 0.05, f"z0 = {kl}: the batch must not clamp the reference point to 0, or it checks no KL term"
    torch.testing.assert_close(ours, theirs, **TOLERANCE)
    # and the same gradients for the policy's weights
    their_grads = torch.autograd.grad(theirs, list(policy.parameters()))
    our_grads = torch.autograd.grad(ours, list(policy.parameters()))
    for theirs_grad, ours_grad in zip(their_grads, our_grads, strict=True):
        torch.testing.assert_close(ours_grad, theirs_grad, **GRADIENT_TOLERANCE)


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
