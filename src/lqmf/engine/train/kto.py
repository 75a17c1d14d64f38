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
