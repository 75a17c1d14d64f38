"""The KTO loss (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"),
as TRL's KTOTrainer computes it (trl/trainer/kto_trainer.py, loss_type "kto", TRL 1.16): thumbs-up
answers are pulled above, thumbs-down answers pushed below, a reference point z0 (the policy's KL
from the reference on mismatched prompt/answer pairs, detached, clamped at 0).

    loss_up   = 1 - sigmoid(beta * (log pi(y|x) - log ref(y|x) - z0))
    loss_down = 1 - sigmoid(beta * (z0 - (log pi(y|x) - log ref(y|x))))
    loss      = mean(desirable_weight * loss_up ++ undesirable_weight * loss_down)
"""

from __future__ import annotations

from typing import Any

from lqmf.engine import data as data_mod


def sequence_logps(model, input_ids, attention_mask, labels) -> Any:
    """Summed log-probability of each row's answer tokens (labels not IGNORE_INDEX), as TRL sums them."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != data_mod.IGNORE_INDEX
    picked = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def kto_losses(policy_logps, reference_logps, desirable, policy_kl_logps, reference_kl_logps, *,
               beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """(losses: desirable rows first, then undesirable ones, as TRL orders them; kl: the reference point).

    desirable: a bool tensor, True for a thumbs-up row. The *_kl_logps are of mismatched pairs
    (prompt i with answer i+1) under the policy and the reference; z0 is their mean difference.
    """
    import torch
    import torch.nn.functional as F

    kl = (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)
    logratios = policy_logps - reference_logps
    chosen = 1 - F.sigmoid(beta * (logratios[desirable] - kl))
    rejected = 1 - F.sigmoid(beta * (kl - logratios[~desirable]))
    return torch.cat((desirable_weight * chosen, undesirable_weight * rejected), 0), kl


def kto_loss(*args: Any, **kwargs: Any):
    """The mean of kto_losses (TRL: losses.nanmean())."""
    losses, _ = kto_losses(*args, **kwargs)
    return losses.nanmean()


def kto_objective(beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """The KTO loss as a training objective for the recipe (engine/train/loop.Loss), over rows that
    with_references made: its sum over a micro-batch (the recipe averages over rows)."""
    import torch

    from lqmf.engine.train.loop import Loss, autocast

    def loss_sum(model, batch):
        with autocast(batch["input_ids"].device.type):
            policy = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            with torch.no_grad():
                policy_kl = sequence_logps(model, batch["kl_input_ids"], batch["kl_attention_mask"],
                                           batch["kl_labels"])
        losses, _ = kto_losses(policy, batch["ref_logp"], batch["kto_label"], policy_kl, batch["kl_ref_logp"],
                               beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
        return losses.sum()

    return Loss(loss_sum, per_example=True)


def with_references(model, rows: list[dict[str, Any]], desirable: list[bool], pad_id: int, device: str,
                    batch_size: int = 8) -> None:
    """Give each encoded row (input_ids, labels) its KTO fields, in place: its label, its mismatched pair
    (the previous row's answer after its prompt, (x_i, y_{i-1}) as TRL 1.16 pairs them, over the whole row
    list where TRL rotates within each batch) and both log-probabilities under model,
    the reference (the parent version, before the first step)."""
    import torch

    n = len(rows)
    for i, row in enumerate(rows):
        row["kto_label"] = desirable[i]
        row["kl_input_ids"], row["kl_labels"] = mismatched_pair(row, rows[(i - 1) % n])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, n, batch_size):
            chunk = rows[start: start + batch_size]
            plain = data_mod.collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in chunk], pad_id,
                                     False)
            pairs = data_mod.collate([{"input_ids": r["kl_input_ids"], "labels": r["kl_labels"]} for r in chunk],
                                     pad_id, False)
            own = sequence_logps(model, *(plain[k].to(device) for k in ("input_ids", "attention_mask", "labels")))
            kl = sequence_logps(model, *(pairs[k].to(device) for k in ("input_ids", "attention_mask", "labels")))
            for row, value, kl_value in zip(chunk, own.tolist(), kl.tolist(), strict=True):
                row["ref_logp"], row["kl_ref_logp"] = value, kl_value
    if was_training:
        model.train()


def mismatched_pair(row: dict[str, Any], other: dict[str, Any]) -> tuple[list[int], list[int]]:
    """row's prompt (the tokens before its answer) followed by other's answer tokens."""
    prompt_end = next(i for i, label in enumerate(row["labels"]) if label != data_mod.IGNORE_INDEX)
    answer_start = next(i for i, label in enumerate(other["labels"]) if label != data_mod.IGNORE_INDEX)
    answer = other["input_ids"][answer_start:]
    return row["input_ids"][:prompt_end] + answer, [data_mod.IGNORE_INDEX] * prompt_end + other["labels"][answer_start:]
