"""`lqmf learn ADAPTER`: a new version of an adapter trained on the feedback its users gave.

setup (the family's current version, its new feedback, the original data) -> if too little is new,
stop having changed nothing -> train the parent's LoRA further through the training recipe, mixed
with a replay sample of the original training data: on the corrections (sft; classification:
corrected labels), or on the ratings through the KTO loss (kto; engine/train/kto.py, the parent as
the reference) -> evaluate old and new on the original held-out split and on held-out corrections ->
register ADAPTER-vN only when the quality gate passes (staging + rename under the run lock, so a
kill leaves no half version) -> with promote, make it active and hot-swap a running server.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lqmf.core import config as cfg
from lqmf.core import learning
from lqmf.core.datasets import load_task_dataset
from lqmf.core.derived import Gate
from lqmf.core.errors import InputError, Interrupted
from lqmf.core.faults import fault_point
from lqmf.core.fsutil import atomic_write_text
from lqmf.core.manifest import build_manifest
from lqmf.core.registry import Registry
from lqmf.core.workspace import Workspace

HELD_OUT_FEEDBACK = 0.2
METHODS = ("auto", "sft", "kto")


@dataclass
class LearnSettings:
    """What `lqmf learn` may change; None keeps the parent's setting."""

    method: str = "auto"
    min_new: int = 1
    promote: bool = False
    epochs: float = 3.0
    learning_rate: float | None = None
    replay: float = 1.0  # replayed original examples per feedback example
    max_drop: float = 0.02  # accuracy points (classification) or relative loss rise the gate allows
    hold_out: float = HELD_OUT_FEEDBACK
    beta: float = 0.1  # KTO's beta: how far from the parent the ratings may pull


def choose_method(settings: LearnSettings, task: str, pending: list[dict[str, Any]]) -> tuple[str, list[dict]]:
    """sft (corrections) or kto (ratings, corrections as good answers) and the feedback it learns from.
    auto: sft when there are at least --min-new corrections, else kto (generative adapters)."""
    corrections = [item for item in pending if item.get("correction") is not None]
    method = settings.method
    if method == "auto":
        method = "sft" if len(corrections) >= settings.min_new or task == "classification" else "kto"
    if method == "kto" and task == "classification":
        raise InputError("--method kto is for generative adapters; a classifier learns from corrected labels "
                         "(--method sft)")
    return method, corrections if method == "sft" else [
        item for item in pending if item.get("rating") or item.get("correction") is not None]


def learn(workspace: Workspace, adapter: str, settings: LearnSettings,
          progress: Callable[[str], None] = lambda message: None, events: Any = None) -> dict[str, Any]:
    """Learn a new version of ADAPTER's family from its new feedback; what happened, as a dict."""
    if settings.method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, got '{settings.method}'")
    registry = Registry(workspace)
    root = learning.family_root(registry, adapter)
    members = learning.family_members(registry, root)
    parent = registry.get_intact(learning.current_member(registry, members))
    pending = learning.pending_feedback(workspace, members)
    method, usable = choose_method(settings, parent.manifest["task"], pending)
    corrections = sum(1 for item in pending if item.get("correction") is not None)
    base_answer = {"adapter": root, "parent": parent.name, "method": method, "new_feedback": len(pending),
                   "corrections": corrections, "ratings_only": len(pending) - corrections}
    if len(usable) < max(settings.min_new, 1):
        what = "correction(s)" if method == "sft" else "rated or corrected answer(s)"
        return {**base_answer, "learned": False,
                "reason": f"{len(usable)} new {what}, fewer than --min-new {max(settings.min_new, 1)}"}
    name, version = learning.next_version_name(registry, root, members)
    run = LearnRun(workspace, registry, parent, root, name, version, settings, progress, events)
    result = run.execute(usable, method)
    answer = {**base_answer, **result}
    if result["learned"] and settings.promote:
        answer["promoted"] = promote(workspace, name)
    return answer


def promote(workspace: Workspace, name: str, action: str = "switch") -> dict[str, Any]:
    """Make NAME active, hot-swapping the running server of its base first (a refusal changes nothing)."""
    from lqmf.core.serving import notify_server

    registry = Registry(workspace)
    registry.get_intact(name)
    served = notify_server(workspace, action, name)
    change = registry.activate(name)
    return {**change, "server": served}


class LearnRun:
    """One version learned: data, training, evaluation, gate and registration."""

    def __init__(self, workspace: Workspace, registry: Registry, parent, root: str, name: str, version: int,
                 settings: LearnSettings, progress: Callable[[str], None], events: Any):
        self.workspace, self.registry, self.parent, self.root = workspace, registry, parent, root
        self.name, self.version, self.settings, self.progress, self.events = name, version, settings, progress, events
        manifest = parent.manifest
        self.task = manifest["task"]
        self.classification = self.task == "classification"
        self.parent_config = manifest.get("config") or {}
        lineage = manifest.get("lineage") or {}
        self.original = lineage.get("original") or {
            "dataset_path": self.parent_config.get("dataset_path"),
            "validation_split": self.parent_config.get("validation_split", 0.1),
            "seed": self.parent_config.get("seed", 42)}
        self.run_dir = learning.learning_dir(workspace) / "runs" / name

    def config(self, data_path: Path) -> cfg.TrainConfig:
        values = {k: v for k, v in self.parent_config.items() if v is not None}
        values.update(job_name=self.name, dataset_path=str(data_path), validation_split=0.0, max_steps=-1,
                      num_train_epochs=self.settings.epochs, eval_at_start=False)
        if self.settings.learning_rate is not None:
            values["learning_rate"] = self.settings.learning_rate
        return cfg.resolve_config({}, {k: cfg.coerce_value(k, v, f"{self.parent.name}'s config: {k}")
                                       for k, v in values.items()})

    def original_split(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        from lqmf.engine.train.loop import split_examples

        path = self.original.get("dataset_path")
        if not path or not Path(path).is_file():
            raise InputError(f"adapter '{self.parent.name}': its training data {path} is gone; learning replays it "
                             "and scores on its held-out split")
        dataset = load_task_dataset(Path(path), self.task)
        train, held = split_examples(dataset, float(self.original["validation_split"]), int(self.original["seed"]))
        return self.corrected(train), self.corrected(held)

    def corrected(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Original classification examples with the label a user's correction gave the same text: the
        best truth there is, so replay does not teach the old mistake back and the gate scores the truth."""
        if not self.classification or not self.corrections:
            return examples
        return [{**e, "label": self.corrections.get(e["text"], e["label"])} for e in examples]

    def mixture(self, train_feedback: list[dict[str, Any]], original_train: list[dict[str, Any]]) -> list[dict]:
        """Corrections as examples plus a seeded replay sample of the original training examples
        (classification: at least one of each label, so the label set stays the parent's)."""
        rng = random.Random(int(self.original["seed"]) + self.version)
        examples = [learning.sft_example(item) for item in train_feedback]
        count = min(len(original_train), round(len(examples) * self.settings.replay))
        replay = rng.sample(original_train, count)
        if self.classification:
            present = {e["label"] for e in replay} | {e["label"] for e in examples}
            for label in sorted({e["label"] for e in original_train} - present):
                replay.append(next(e for e in original_train if e["label"] == label))
        mixed, self.replayed = examples + replay, len(replay)
        rng.shuffle(mixed)
        return mixed

    def rated_mixture(self, train_feedback: list[dict[str, Any]], original_train: list[dict[str, Any]]) -> list[dict]:
        """KTO rows: corrections and thumbs-up answers desirable, thumbs-down answers undesirable, plus a
        seeded replay sample of the original examples (desirable); each a messages example with kto_label."""
        rows = []
        for item in train_feedback:
            if item.get("correction") is not None:
                rows.append({**learning.sft_example(item), "kto_label": True})
            if item.get("rating"):
                answer = {"role": "assistant", "content": item["answer"]}
                rows.append({"messages": [*learning.user_messages(item), answer], "kto_label": item["rating"] == "up"})
        rng = random.Random(int(self.original["seed"]) + self.version)
        count = min(len(original_train), round(len(rows) * self.settings.replay))
        rows += [{**example, "kto_label": True} for example in rng.sample(original_train, count)]
        self.replayed = count
        rng.shuffle(rows)
        return rows

    def execute(self, feedback: list[dict[str, Any]], method: str) -> dict[str, Any]:
        from lqmf.engine.train.loop import CHECKPOINT_FOLDERS
        from lqmf.engine.train.run import terminate_as_interrupt

        self.method = method
        corrections = [item for item in feedback if item.get("correction") is not None]
        self.corrections = {str(item["prompt"]): item["correction"] for item in corrections}
        train_feedback, held_feedback = learning.split_held_out(feedback, self.settings.hold_out,
                                                                int(self.original["seed"]))
        original_train, original_held = self.original_split()
        mixed = (self.mixture(train_feedback, original_train) if method == "sft"
                 else self.rated_mixture(train_feedback, original_train))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        data_path = self.run_dir / "train.jsonl"
        atomic_write_text(data_path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in mixed))
        config = self.config(data_path)
        staging = self.registry.staging_path(self.name)
        with self.registry.training_run(self.name, wait=5.0), terminate_as_interrupt():
            shutil.rmtree(staging, ignore_errors=True)  # a run a kill left behind: its lock is ours now
            staging.mkdir(parents=True)
            try:
                scores, outcome, dataset, prepared = self.train(config, staging, original_held, held_feedback)
                refusal = self.gate_refusal(scores)
                lineage = {"operation": "learn", "family": self.root, "version": self.version,
                           "parent": self.parent.name, "feedback": [item["id"] for item in train_feedback],
                           "held_out_feedback": [item["id"] for item in held_feedback],
                           "method": method, "replayed": self.replayed,
                           "original": self.original, "evaluation": scores}
                if refusal:
                    shutil.rmtree(staging, ignore_errors=True)
                    return {"learned": False, "version": None, "evaluation": scores,
                            "reason": f"the quality gate refused {self.name}: {refusal}"}
                manifest = build_manifest(self.name, config, self.registry.resolve_base(self.parent), dataset,
                                          prepared.plan(), outcome.metrics, outcome.runtime)
                manifest["lineage"] = lineage
                fault_point("learn.before_finalize")
                target = self.registry.finalize(self.name, staging, manifest, scratch=CHECKPOINT_FOLDERS)
            except Interrupted as err:
                shutil.rmtree(staging, ignore_errors=True)
                raise Interrupted(f"learning {self.name} stopped ({err.message.split(';')[0]}); nothing registered, "
                                  f"the active adapter is unchanged", exit_code=err.exit_code) from None
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return {"learned": True, "version": self.name, "path": str(target), "evaluation": scores,
                "trained_on": {"feedback": len(train_feedback), "replayed": lineage["replayed"],
                               "held_out_feedback": len(held_feedback)}, "metrics": outcome.metrics}

    def train(self, config: cfg.TrainConfig, staging: Path, original_held: list[dict], held_feedback: list[dict]):
        """The parent's LoRA (weights loaded into a fresh one of its shape) trained further through the
        recipe; scores of old (before the first step) and new on both held-out sets."""
        import torch
        from safetensors.torch import load_file

        from lqmf.engine.train import loop as steps
        from lqmf.engine.train.recipe import train as run_recipe

        model_ref = self.registry.resolve_base(self.parent)
        dataset = load_task_dataset(Path(config.dataset_path), self.task)
        parent_labels = [self.parent.manifest.get("id2label", {})[str(i)]
                         for i in range(len(self.parent.manifest.get("id2label") or {}))]
        if self.classification and dataset.labels != parent_labels:
            raise InputError(f"the learning data's labels {dataset.labels} differ from {self.parent.name}'s "
                             f"{parent_labels}")
        self.progress(f"preparing {len(dataset.examples)} examples (corrections and replayed originals)")
        prepared = steps.prepare(config, model_ref, dataset)
        memory = steps.plan_memory(config, model_ref, prepared)
        torch.manual_seed(config.seed)
        self.progress(f"loading {self.parent.name} on {model_ref.reference}")
        loaded = steps.setup_model(config, model_ref, prepared, self.task)
        steps.apply_weights(loaded.model, {"weights": load_file(str(self.parent.path / "adapter_model.safetensors"))})
        held = self.encoded(prepared, original_held, "original held-out")
        feedback = self.encoded(prepared, [learning.sft_example(item) for item in held_feedback
                                           if item.get("correction") is not None], "held-out feedback")
        old = self.scores(loaded, prepared, held, feedback)
        objective = self.kto_objective(loaded, prepared, config) if self.method == "kto" else None
        self.progress(f"training {self.name} from {self.parent.name} ({self.method}): {prepared.total_steps} steps")
        outcome = run_recipe(config, model_ref, dataset, staging, events=self.events, prepared=prepared,
                             memory=memory, loaded=loaded, loss=objective)
        fault_point("learn.trained")
        new = self.scores(loaded, prepared, held, feedback)
        return {"old": old, "new": new}, outcome, dataset, prepared

    def kto_objective(self, loaded, prepared, config: cfg.TrainConfig):
        """The KTO loss, with every training row's reference log-probabilities taken from the parent now."""
        from lqmf.engine.train import kto

        labels = [bool(json.loads(line)["kto_label"])
                  for line in Path(config.dataset_path).read_text(encoding="utf-8").splitlines()]
        if len(prepared.train) != len(labels):
            raise InputError(f"{config.dataset_path}: {len(labels) - len(prepared.train)} rated answers longer than "
                             f"max_seq_length={config.max_seq_length} left no answer tokens; raise max_seq_length")
        self.progress(f"reference log-probabilities of {len(labels)} answers under {self.parent.name}")
        kto.with_references(loaded.model, prepared.train, labels, loaded.tokenizer.pad_token_id, loaded.device)
        return kto.kto_objective(self.settings.beta)

    def encoded(self, prepared, examples: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
        from lqmf.engine import data as data_mod

        label_ids = {label: i for i, label in enumerate(prepared.labels)} if prepared.labels else None
        return data_mod.encode_examples(prepared.tokenizer, examples, self.task, self.parent_config.get(
            "max_seq_length", 512), "truncate", label_ids, source=source).rows

    def scores(self, loaded, prepared, held: list[dict], feedback: list[dict]) -> dict[str, Any]:
        from lqmf.engine.train.loop import evaluate

        n_labels = len(prepared.labels)
        pick = ("accuracy", "loss") if self.classification else ("loss",)
        result = {}
        for key, rows in (("original", held), ("feedback", feedback)):
            if rows:
                measured = evaluate(loaded, rows, self.classification, 8, n_labels)
                result[key] = {k: round(float(measured[k]), 6) for k in pick}
        return result

    def gate_refusal(self, scores: dict[str, Any]) -> str | None:
        """The quality gate (core.derived.Gate) with the old version's score, less max_drop, as its bar."""
        old, new = scores["old"], scores["new"]
        if not old:
            return Gate(max_loss=0.0).refusal(None)
        metric = "accuracy" if self.classification else "loss"
        for key in ("original", "feedback"):
            if key not in old:
                continue
            if self.classification:
                gate = Gate(min_metric=old[key]["accuracy"] - self.settings.max_drop)
            else:
                gate = Gate(max_loss=old[key]["loss"] * (1 + self.settings.max_drop))
            if gate.refusal(new[key]):
                where = "the original held-out split" if key == "original" else "the held-out feedback"
                return (f"on {where} its {metric} {new[key][metric]:.4f} is worse than {self.parent.name}'s "
                        f"{old[key][metric]:.4f} by more than --max-drop {self.settings.max_drop}")
        return None
