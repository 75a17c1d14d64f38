"""Defaults that depend on the data set's size: enough optimizer steps on small sets to learn.

A guide-sized set (50-1,000 rows) at the fixed defaults of 3 epochs and an effective batch of 16
gives a few dozen optimizer steps, too few for LoRA (and a classifier head that starts from random)
to move. Unless the user set them, the gradient accumulation shrinks so that an epoch has at least
MIN_STEPS_PER_EPOCH steps, and the epochs grow so that the run has at least MIN_STEPS steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_EPOCHS = 3.0
DEFAULT_ACCUMULATION = 8
MIN_STEPS = 100
MIN_STEPS_PER_EPOCH = 10
MAX_AUTO_EPOCHS = 20.0
# The classifier head starts from random weights: it needs a larger step than the LoRA matrices.
HEAD_LEARNING_RATE_FACTOR = 10.0


@dataclass(frozen=True)
class Schedule:
    accumulation: int
    epochs: float
    steps_per_epoch: int
    total_steps: int
    notes: tuple[str, ...] = ()


def steps_per_epoch(n_train: int, micro_batch: int, accumulation: int) -> int:
    return max(1, math.ceil(n_train / (micro_batch * accumulation)))


def plan_schedule(n_train: int, micro_batch: int, accumulation: int | None, epochs: float | None,
                  max_steps: int, processes: int = 1) -> Schedule:
    """The accumulation, epochs and step count for n_train examples; None means 'choose for me'.

    A chosen accumulation keeps the effective batch divisible by the processes that share it.
    """
    notes = []
    if accumulation is None:
        def splittable(value: int) -> int:  # the effective batch divides over the processes
            while (micro_batch * value) % processes:
                value += 1
            return value

        accumulation = splittable(DEFAULT_ACCUMULATION)
        fitting = splittable(max(1, n_train // (micro_batch * MIN_STEPS_PER_EPOCH)))
        if fitting < accumulation:
            notes.append(f"small data set ({n_train} training examples): gradient accumulation "
                         f"{accumulation} -> {fitting} (effective batch {micro_batch * fitting}) so that "
                         f"an epoch has {steps_per_epoch(n_train, micro_batch, fitting)} optimizer steps; "
                         "set gradient_accumulation_steps to choose")
            accumulation = fitting
    per_epoch = steps_per_epoch(n_train, micro_batch, accumulation)
    if epochs is None:
        epochs = DEFAULT_EPOCHS
        if max_steps <= 0 and per_epoch * epochs < MIN_STEPS:
            epochs = float(min(MAX_AUTO_EPOCHS, math.ceil(MIN_STEPS / per_epoch)))
            notes.append(f"small data set: {epochs:g} epochs instead of {DEFAULT_EPOCHS:g} so that the run has "
                         f"{math.ceil(epochs * per_epoch)} optimizer steps; set num_train_epochs to choose")
    total = max_steps if max_steps > 0 else max(1, math.ceil(epochs * per_epoch))
    return Schedule(accumulation, epochs, per_epoch, total, tuple(notes))


def head_learning_rate(task: str, learning_rate: float, explicit: float | None) -> float | None:
    """The classifier head's learning rate (classification only); an explicit value wins."""
    if task != "classification":
        return None
    return explicit if explicit is not None else learning_rate * HEAD_LEARNING_RATE_FACTOR
