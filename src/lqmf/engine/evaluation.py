"""Benchmark an adapter, and optionally its base model: speed, memory and task quality.

setup (check the prompts and the quality data, before any model loads) -> for each model: load,
warm up, time the prompts, score the quality set, read the memory peak -> one result dict that
core/bench.py saves and compares. Models load only through engine/inference.py, so a benchmark
measures the same path `lqmf test` and `lqmf serve` use.
"""

from __future__ import annotations

import gc
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lqmf.core.bench import RESULT_VERSION, builtin_prompts, deltas, latency_summary, read_prompts, save_result
from lqmf.core.config import DEVICES
from lqmf.core.datasets import load_task_dataset
from lqmf.core.errors import InputError, require
from lqmf.core.manifest import now_iso
from lqmf.core.metrics import classification_scores, confusion_matrix, rouge_scores
from lqmf.core.registry import AdapterEntry, Registry
from lqmf.core.serving import ServedModel
from lqmf.core.system import LIBRARIES, library_versions
from lqmf.core.workspace import Workspace
from lqmf.engine import data as data_mod
from lqmf.engine import inference
from lqmf.engine.loading import select_device
from lqmf.engine.train.memory import memory_in_use_gb, peak_memory_gb, reset_peak_memory

CLASSIFY_BATCH = 32
SAMPLES_KEPT = 3  # generated answers kept in the result, to eyeball beside the scores


@dataclass
class BenchOptions:
    prompts: list[str]
    prompts_file: str | None = None
    max_new_tokens: int = 64
    warmup: int = 1
    eval_file: Path | None = None
    eval_limit: int = 200  # 0: every example
    with_base: bool = False
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return {"prompts_file": self.prompts_file, "prompt_count": len(self.prompts),
                "max_new_tokens": self.max_new_tokens, "warmup": self.warmup,
                "eval_file": str(self.eval_file) if self.eval_file else None, "eval_limit": self.eval_limit,
                "base": self.with_base, "device": self.device}


@dataclass
class QualitySet:
    """The examples quality is measured on, and where they came from."""

    examples: list[dict[str, Any]]
    source: dict[str, Any]


def _check_labels(examples: list[dict[str, Any]], labels: list[str], where: str, adapter: str) -> None:
    unknown = sorted({e["label"] for e in examples} - set(labels))
    if unknown:
        raise InputError(f"{where}: label(s) {', '.join(map(repr, unknown))} unknown to adapter '{adapter}' "
                         f"(its labels: {', '.join(labels)})")


def quality_set(entry: AdapterEntry, eval_file: Path | None, limit: int, notes: list[str]) -> QualitySet | None:
    """The adapter's held-out validation split, re-created exactly as training made it, or an eval file.

    Returns None (with a note) when there is nothing to measure quality on.
    """
    from lqmf.engine.train.loop import split_examples

    manifest = entry.manifest
    task = manifest["task"]
    config = manifest.get("config") or {}
    labels = inference.labels_of(entry)
    if eval_file is not None:
        data = load_task_dataset(eval_file, task)
        examples = data.examples
        source = {"kind": "eval_file", "path": str(data.path), "sha256": data.sha256}
    else:
        path = Path(config.get("dataset_path") or manifest["dataset"]["path"])
        fraction = float(config.get("validation_split") or 0)
        if fraction <= 0:
            notes.append("no quality figures: the adapter was trained without a validation split "
                         "(validation_split=0); pass --eval-file")
            return None
        if not path.is_file():
            notes.append(f"no quality figures: the training dataset {path} no longer exists; pass --eval-file")
            return None
        data = load_task_dataset(path, task)
        if data.sha256 != manifest["dataset"].get("sha256"):
            notes.append(f"warning: {path} changed since '{entry.name}' was trained (sha256 differs): the "
                         "re-created validation split may hold examples the adapter trained on")
        _, examples = split_examples(data, fraction, int(config.get("seed", 42)))
        if not examples:
            notes.append("no quality figures: the dataset is too small to hold out a validation split; "
                         "pass --eval-file")
            return None
        source = {"kind": "validation_split", "path": str(path), "sha256": data.sha256,
                  "validation_split": fraction, "seed": config.get("seed")}
    if task == "classification":
        _check_labels(examples, labels, source["path"], entry.name)
    available = len(examples)
    if limit and available > limit:
        examples = examples[:limit]
        notes.append(f"quality measured on the first {limit} of {available} examples (--eval-limit)")
    return QualitySet(examples, {**source, "examples": len(examples), "available": available})


# ----------------------------------------------------------------------------- measuring one model


class LocalModel:
    """A model loaded in this process, answering as core.serving.ServedModel does over HTTP."""

    def __init__(self, model: inference.InferenceModel, max_length: int):
        self.model, self.task, self.max_length = model, model.task, max_length

    def runtime(self) -> dict[str, Any]:
        return self.model.loaded.runtime()

    def classify(self, texts: list[str]) -> list[dict[str, float]]:
        return inference.classify(self.model, texts, max_length=self.max_length)

    def generate(self, prompt: str | list[dict[str, str]], *, max_new_tokens: int,
                 min_new_tokens: int = 0) -> dict[str, Any]:
        generation = inference.generate(self.model, inference.prompt_ids(self.model, prompt),
                                        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
        return {"text": generation.text, "finish_reason": generation.finish_reason,
                "prompt_tokens": generation.prompt_tokens, "new_tokens": generation.new_tokens,
                "seconds": generation.seconds, "first_token_seconds": generation.first_token_seconds}


Answerer = LocalModel | ServedModel


def _speed(model: Answerer, options: BenchOptions):
    """Time every prompt after the warm-up runs; generative prompts make exactly max_new_tokens tokens."""
    classification = model.task == "classification"
    n_tokens = options.max_new_tokens

    def answer(prompt: str) -> dict[str, Any]:
        if classification:
            started = time.perf_counter()
            scores = model.classify([prompt])[0]
            seconds = time.perf_counter() - started
            label = max(scores, key=scores.get)
            return {"prompt": prompt, "output": label, "confidence": scores[label], "seconds": seconds}
        generation = model.generate(prompt, max_new_tokens=n_tokens, min_new_tokens=n_tokens)
        return {"prompt": prompt, "output": generation["text"], "seconds": generation["seconds"],
                "prompt_tokens": generation["prompt_tokens"], "new_tokens": generation["new_tokens"],
                "first_token_seconds": generation["first_token_seconds"]}

    for index in range(options.warmup):
        answer(options.prompts[index % len(options.prompts)])
    responses = [answer(prompt) for prompt in options.prompts]
    seconds = [r["seconds"] for r in responses]
    speed: dict[str, Any] = {"prompts": len(responses), "warmup_runs": options.warmup,
                             "response_seconds": latency_summary(seconds)}
    if classification:
        speed["texts_per_second"] = len(responses) / sum(seconds)
    else:
        generated = sum(r["new_tokens"] for r in responses)
        first = [r["first_token_seconds"] for r in responses if r["first_token_seconds"] is not None]
        speed.update(max_new_tokens=n_tokens, generated_tokens=generated, tokens_per_second=generated / sum(seconds),
                     first_token_avg_seconds=sum(first) / len(first) if first else None)
    return speed, responses


def _classification_quality(model: Answerer, labels: list[str], examples: list[dict[str, Any]]) -> dict[str, Any]:
    label_ids = {label: i for i, label in enumerate(labels)}
    truth = [label_ids[e["label"]] for e in examples]
    predicted: list[int] = []
    for start in range(0, len(examples), CLASSIFY_BATCH):
        texts = [e["text"] for e in examples[start: start + CLASSIFY_BATCH]]
        for scores in model.classify(texts):
            predicted.append(label_ids[max(scores, key=scores.get)])
    n_labels = len(labels)
    return {"examples": len(examples), **classification_scores(truth, predicted, n_labels),
            "labels": labels, "confusion_matrix": confusion_matrix(truth, predicted, n_labels)}


def _last_user_turn(messages: list[dict[str, str]]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def _eval_loss(model: Answerer, examples: list[dict[str, Any]], config: dict[str, Any],
               notes: list[str]) -> dict[str, float]:
    """Eval loss and perplexity on the reference answers (training's own evaluation); they need the logits,
    so a model answering through a server has none."""
    from lqmf.engine.train.loop import evaluate

    if isinstance(model, ServedModel):
        note = "eval loss and perplexity not measured through the server (they need the model's logits): --local"
        notes += [note] if note not in notes else []
        return {}
    overlong = config.get("overlong", "truncate")
    encoded = data_mod.encode_examples(model.model.tokenizer, examples, model.task,
                                       int(config.get("max_seq_length", 512)),
                                       "truncate" if overlong == "error" else overlong, source="evaluation")
    notes += [n for n in encoded.notes if n not in notes]
    batch = max(1, int(config.get("per_device_train_batch_size", 2)) * 2)
    return evaluate(model.model.loaded, encoded.rows, False, batch) if encoded.rows else {}


def _generative_quality(model: Answerer, examples: list[dict[str, Any]], config: dict[str, Any],
                        max_new_tokens: int, notes: list[str]) -> dict[str, Any]:
    """Perplexity on the reference answers and ROUGE of greedy answers."""
    scores = _eval_loss(model, examples, config, notes)
    predictions, references = [], []
    for example in examples:
        predictions.append(model.generate(example["messages"][:-1], max_new_tokens=max_new_tokens)["text"])
        references.append(example["messages"][-1]["content"])
    samples = [{"prompt": _last_user_turn(e["messages"]), "reference": r, "answer": p}
               for e, r, p in zip(examples[:SAMPLES_KEPT], references, predictions, strict=False)]
    return {"examples": len(examples), **scores, **rouge_scores(predictions, references), "samples": samples}


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def answer_figures(model: Answerer, labels: list[str], options: BenchOptions, quality: QualitySet | None,
                   config: dict[str, Any], notes: list[str], progress: Callable[[str], None]) -> dict[str, Any]:
    """Speed and quality of a model, in this process or through a server alike."""
    progress(f"timing {len(options.prompts)} prompts after {options.warmup} warm-up run(s)")
    speed, responses = _speed(model, options)
    scores = None
    if quality is not None:
        progress(f"scoring quality on {len(quality.examples)} examples")
        if model.task == "classification":
            scores = _classification_quality(model, labels, quality.examples)
        else:
            scores = _generative_quality(model, quality.examples, config, options.max_new_tokens, notes)
    return {"runtime": model.runtime(), "speed": speed, "quality": scores, "responses": responses}


def measure(load: Callable[[], inference.InferenceModel], description: str, options: BenchOptions,
            quality: QualitySet | None, config: dict[str, Any], notes: list[str],
            progress: Callable[[str], None]) -> dict[str, Any]:
    """Load one model and measure it: load time, speed, memory peak and quality."""
    device = select_device(options.device).type
    _release(device)
    reset_peak_memory(device)
    progress(f"loading {description}")
    started = time.perf_counter()
    model = load()
    load_seconds = time.perf_counter() - started
    if inference.KEPT.last_reused:
        notes.append(f"{description} was already loaded in this process (lqmf shell): its load time "
                     f"({load_seconds:.2f} s) is the time to reuse it")
    after_load = memory_in_use_gb(device)
    figures = answer_figures(LocalModel(model, int(config.get("max_seq_length", 512))), model.labels, options,
                             quality, config, notes, progress)
    run = {"model": description, "load_seconds": load_seconds, **figures,
           "memory": {"kind": "vram" if device == "cuda" else "rss", "device": device,
                      "after_load_gb": after_load, "peak_gb": peak_memory_gb(device)}}
    del model
    _release(device)
    return run


def measure_served(model: ServedModel, description: str, labels: list[str], options: BenchOptions,
                   quality: QualitySet | None, config: dict[str, Any], notes: list[str],
                   progress: Callable[[str], None]) -> dict[str, Any]:
    """Measure a model a running server holds, over HTTP: no load time; memory as the server reports it."""
    progress(f"asking the server {model.url} for {description}")
    figures = answer_figures(model, labels, options, quality, config, notes, progress)
    memory = model.memory()
    if memory["peak_gb"] is None:
        note = f"peak memory not measured: the server {model.url} reports none on {memory['device'] or 'its device'}"
        notes += [note] if note not in notes else []
    return {"model": description, "load_seconds": None, **figures, "memory": memory}


# ----------------------------------------------------------------------------- the whole benchmark


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: str) -> dict[str, Any]:
    import psutil
    import torch

    info: dict[str, Any] = {
        "device": device, "cpu": _cpu_name(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1), "platform": platform.platform(),
        "python": platform.python_version(), "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def run_benchmark(workspace: Workspace, adapter: str, options: BenchOptions,
                  progress: Callable[[str], None] | None = None,
                  served: dict[str, Any] | None = None) -> dict[str, Any]:
    """Benchmark an adapter (and with options.with_base its base model); returns the result to save.

    served (core.serving.server_with_adapter's record): measure through that running server, over HTTP.
    """
    progress = progress or (lambda message: None)
    entry = Registry(workspace).get_intact(adapter)
    manifest = entry.manifest
    task = manifest["task"]
    config = manifest.get("config") or {}
    labels = inference.labels_of(entry)
    notes: list[str] = []
    inference.quiet_libraries()
    quality = quality_set(entry, options.eval_file, options.eval_limit, notes)
    if quality is not None and task != "classification":
        require("rouge_score", "rouge-score", "bench")
    base_ref = manifest["base_model"]["reference"]
    if task == "classification" and options.with_base:
        notes.append("the base model has no trained classification head: it gets a randomly initialised "
                     "(seeded) one, so its quality figures are chance level by construction")
    if served is not None:
        adapter_run, base_run = _runs_through_server(served, adapter, base_ref, labels, options, quality, config,
                                                     notes, progress)
    else:
        adapter_run, base_run = _runs_here(workspace, entry, options, quality, config, notes, progress)
    device = adapter_run["memory"]["device"] or adapter_run["runtime"]["device"]
    return {
        "lqmf_benchmark": RESULT_VERSION,
        "adapter": adapter,
        "task": task,
        "base_model": base_ref,
        "created": now_iso(),
        "via": "server" if served is not None else "local",
        "server": served["url"] if served is not None else None,
        "options": options.to_dict(),
        "quality_data": quality.source if quality else None,
        "hardware": hardware(device),
        "versions": library_versions((*LIBRARIES, "rouge-score")),
        "notes": notes,
        "adapter_run": adapter_run,
        "base_run": base_run,
        "deltas": deltas(adapter_run, base_run),
    }


def _runs_here(workspace: Workspace, entry: AdapterEntry, options: BenchOptions, quality: QualitySet | None,
               config: dict[str, Any], notes: list[str], progress: Callable[[str], None]):
    """The adapter's run (and the base's) with each model loaded in this process."""
    import peft  # noqa: F401 - imported before the clock starts: load times count loading, not imports

    manifest = entry.manifest
    base_ref = manifest["base_model"]["reference"]
    adapter_run = measure(lambda: inference.load_for_inference(workspace, entry.name, device=options.device),
                          f"adapter '{entry.name}' on {base_ref}", options, quality, config, notes, progress)
    if not options.with_base:
        return adapter_run, None
    import torch

    resolved = inference.adapter_base(workspace, entry)
    quantized = bool((manifest.get("runtime") or {}).get("quantized_4bit"))

    def load_base() -> inference.InferenceModel:
        torch.manual_seed(int(config.get("seed", 42)))  # the same random head on every run
        return inference.load_for_inference(workspace, None, base=resolved, task=manifest["task"],
                                            labels=inference.labels_of(entry) or None, device=options.device,
                                            quantize_4bit=quantized)

    return adapter_run, measure(load_base, f"base model {base_ref}", options, quality, config, notes, progress)


def _runs_through_server(served: dict[str, Any], adapter: str, base_ref: str, labels: list[str],
                         options: BenchOptions, quality: QualitySet | None, config: dict[str, Any],
                         notes: list[str], progress: Callable[[str], None]):
    """The adapter's run (and the base's) answered by a running server, timed over HTTP."""
    notes.append(f"measured through the running server {served['url']} over HTTP: times include the HTTP round "
                 "trip and any other requests it serves meanwhile; no load time (the model was already loaded)")
    if options.device != "auto":
        notes.append(f"--device {options.device} ignored: the server runs on {served['state'].get('device')}")
    adapter_run = measure_served(ServedModel(served, adapter), f"adapter '{adapter}' on {base_ref}", labels,
                                 options, quality, config, notes, progress)
    base_run = None
    if options.with_base:
        base_run = measure_served(ServedModel(served, served["state"]["base"]), f"base model {base_ref}", labels,
                                  options, quality, config, notes, progress)
    return adapter_run, base_run


def benchmark(workspace: Workspace, adapter: str, prompts_file: str | Path | None = None, *, base: bool = False,
              eval_file: str | Path | None = None, eval_limit: int = 200, max_new_tokens: int = 64,
              warmup: int = 1, device: str = "auto", save: bool = True,
              progress: Callable[[str], None] | None = None, served: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check the inputs (before any model loads), benchmark, and save the result under benchmarks/.

    served: a running server's record (core.serving.server_with_adapter) to measure through.
    The returned result names its file under 'source_file' (as loaded results do).
    """
    if device not in DEVICES:
        raise InputError(f"device must be one of {', '.join(DEVICES)}, got '{device}'")
    for name, value, least in (("max_new_tokens", max_new_tokens, 1), ("warmup", warmup, 0),
                               ("eval_limit", eval_limit, 0)):
        if value < least:
            raise InputError(f"{name} must be at least {least}, got {value}")
    task = Registry(workspace).get(adapter).manifest["task"]
    prompts_path = workspace.resolve_path(prompts_file) if prompts_file else None
    prompts = read_prompts(prompts_path) if prompts_path else builtin_prompts(task)
    options = BenchOptions(prompts, str(prompts_path) if prompts_path else None, max_new_tokens, warmup,
                           workspace.resolve_path(eval_file) if eval_file else None, eval_limit, base, device)
    result = run_benchmark(workspace, adapter, options, progress=progress, served=served)
    if save:
        result["source_file"] = str(save_result(workspace, result))
    return result
