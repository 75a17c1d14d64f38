"""Turning checked examples into token ids, labels and padded batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lqmf.core.errors import InputError

IGNORE_INDEX = -100
# Used when neither the tokenizer nor the model family brings a chat template.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '### System:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + message['content'] + (eos_token if eos_token else '') + '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> str:
    """Give the tokenizer a chat template if it has none; say where the template came from."""
    if getattr(tokenizer, "chat_template", None):
        return "model"
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return "lqmf-default"


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_generative(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and labels for a conversation; only assistant turns carry labels."""
    input_ids: list[int] = []
    labels: list[int] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:index], add_generation_prompt=True)
        full = render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise InputError("the chat template does not render conversations as growing prefixes")
        context = _ids(tokenizer, prompt[len(done):])
        answer = _ids(tokenizer, full[len(prompt):])
        input_ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer
        done = full
    return input_ids, labels


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids that ask the model for the next assistant turn."""
    return _ids(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


PROMPT_TAIL_TOKENS = 8


def truncate_keeping_answer(ids: list[int], labels: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Fit a conversation into max_len by cutting the middle of the prompt, not the answer.

    The prompt keeps its start and its last few tokens (the template's cue for the answer);
    only an answer that cannot fit on its own is cut, at its end.
    """
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    answer = len(ids) - first
    head = max_len - answer - PROMPT_TAIL_TOKENS
    if head < 1 or first <= PROMPT_TAIL_TOKENS:
        return ids[:max_len], labels[:max_len]
    keep = list(range(head)) + list(range(first - PROMPT_TAIL_TOKENS, len(ids)))
    return [ids[i] for i in keep], [labels[i] for i in keep]


@dataclass
class EncodedSet:
    rows: list[dict[str, Any]]
    overlong: int = 0
    dropped: int = 0
    total_tokens: int = 0
    max_tokens: int = 0
    notes: list[str] = field(default_factory=list)


def encode_examples(tokenizer, examples: list[dict[str, Any]], task: str, max_len: int, overlong: str,
                    label_ids: dict[str, int] | None = None, source: str = "dataset") -> EncodedSet:
    """Encode every example, applying the overlong policy and counting what it did."""
    rows: list[dict[str, Any]] = []
    too_long: list[int] = []
    no_answer = 0
    total = longest = 0
    for index, example in enumerate(examples):
        if task == "classification":
            ids = tokenizer(example["text"])["input_ids"]
            labels: Any = label_ids[example["label"]] if label_ids else 0
        elif "input_ids" in example:
            ids, labels = list(example["input_ids"]), list(example["labels"])
            if max(ids) >= len(tokenizer):
                raise InputError(f"{source} example {index + 1}: token id {max(ids)} is outside the "
                                 f"tokenizer's vocabulary ({len(tokenizer)})")
        else:
            ids, labels = encode_generative(tokenizer, example["messages"])
        total += len(ids)
        longest = max(longest, len(ids))
        if len(ids) > max_len:
            too_long.append(index)
            if overlong == "drop":
                continue
            if overlong == "truncate":
                if task == "classification":
                    ids = tokenizer(example["text"], truncation=True, max_length=max_len)["input_ids"]
                else:
                    ids, labels = truncate_keeping_answer(ids, labels, max_len)
                    if all(label == IGNORE_INDEX for label in labels):
                        no_answer += 1
                        continue
        rows.append({"input_ids": ids, "labels": labels})
    result = EncodedSet(rows, overlong=len(too_long), total_tokens=total, max_tokens=longest)
    if too_long:
        if overlong == "error":
            listed = ", ".join(str(i + 1) for i in too_long[:5])
            raise InputError(
                f"{source}: {len(too_long)} example(s) longer than max_seq_length={max_len} tokens "
                f"(examples {listed}{'...' if len(too_long) > 5 else ''}; longest {longest}); "
                "raise max_seq_length or set overlong=truncate|drop"
            )
        action = ("dropped" if overlong == "drop" else "truncated" if task == "classification"
                  else "truncated in the middle of the prompt, keeping the answer")
        result.notes.append(
            f"{len(too_long)} of {len(examples)} {source} examples exceed max_seq_length={max_len} "
            f"(longest {longest} tokens): {action}"
        )
        if no_answer:
            result.notes.append(f"{no_answer} truncated example(s) had no answer tokens left and were dropped")
    result.dropped = len(examples) - len(rows)
    return result


def collate(rows: list[dict[str, Any]], pad_id: int, classification: bool):
    """Right-padded tensors for a micro-batch."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = (torch.tensor([r["labels"] for r in rows], dtype=torch.long) if classification
              else torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long))
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        attention[i, :n] = 1
        if not classification:
            labels[i, :n] = torch.tensor(row["labels"])
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if "kto_label" in rows[0]:  # rated answers (engine/train/kto.py): label, reference and mismatched pair
        pairs = collate([{"input_ids": r["kl_input_ids"], "labels": r["kl_labels"]} for r in rows], pad_id, False)
        batch.update({f"kl_{key}": value for key, value in pairs.items()},
                     kto_label=torch.tensor([bool(r["kto_label"]) for r in rows]),
                     ref_logp=torch.tensor([r["ref_logp"] for r in rows], dtype=torch.float32),
                     kl_ref_logp=torch.tensor([r["kl_ref_logp"] for r in rows], dtype=torch.float32))
    return batch


def pack(rows: list[dict[str, Any]], capacity: int) -> list[list[dict[str, Any]]]:
    """Rows grouped into sequences of at most capacity tokens each (first fit, longest first); a row
    longer than capacity stays alone."""
    bins: list[list[dict[str, Any]]] = []
    room: list[int] = []
    for row in sorted(rows, key=lambda r: -len(r["input_ids"])):
        size = len(row["input_ids"])
        place = next((i for i, left in enumerate(room) if size <= left), None)
        if place is None:
            bins.append([row])
            room.append(capacity - size)
        else:
            bins[place].append(row)
            room[place] -= size
    return bins


def collate_packed(bins: list[list[dict[str, Any]]], pad_id: int):
    """One sequence per bin, its examples end to end, right-padded; position ids restart at each
    example (and at the padding), which transformers reads as separate sequences: attention stays
    inside each example. Each example's first token gets no label, as a row's first token has none
    after the shift, so the loss is the unpacked one."""
    import torch

    width = max(sum(len(r["input_ids"]) for r in rows) for rows in bins)
    input_ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    for i, rows in enumerate(bins):
        start = 0
        for row in rows:
            n = len(row["input_ids"])
            input_ids[i, start: start + n] = torch.tensor(row["input_ids"])
            labels[i, start + 1: start + n] = torch.tensor(row["labels"][1:])
            positions[i, start: start + n] = torch.arange(n)
            start += n
        positions[i, start:] = torch.arange(width - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}
