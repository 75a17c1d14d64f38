"""`lqmf test ADAPTER PROMPT`: answer one prompt with an adapter (and, with --base, its base model)."""

from __future__ import annotations

import sys
from typing import Any

import typer

from lqmf.cli.common import JsonOption, LocalOption, WorkspaceOption, running_server_for, workspace
from lqmf.cli.output import info, print_json, print_table
from lqmf.cli.phases import importing, show_phases
from lqmf.core.errors import InputError
from lqmf.core.serving import ServedModel


def _read_prompt(prompt: str) -> str:
    text = sys.stdin.read() if prompt == "-" else prompt
    if not text.strip():
        raise InputError("the prompt is empty")
    return text.rstrip("\n") if prompt == "-" else text


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def answer(
    ctx: typer.Context,
    adapter: str = typer.Argument(..., help="Adapter name (see adapters/)."),
    prompt: str = typer.Argument(..., help="The prompt, or the text to classify; '-' reads it from stdin."),
    base: bool = typer.Option(False, "--base", help="Also answer with the base model alone, side by side."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="The most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling (with --temperature)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for sampling (the same seed answers the same)."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as it is, without the chat template."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | mps"),
    four_bit: bool | None = typer.Option(None, "--4bit/--no-4bit",
                                         help="Load the base in 4-bit (default: as the adapter was trained)."),
    local: bool = LocalOption,
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Answer one prompt with an adapter, streaming tokens as they come.

    The prompt is formatted as the adapter's task was trained (its chat
    template); a classification adapter prints the label's probability.
    With --base the base model answers too (the adapter switched off).
    A running `lqmf serve` of this workspace that holds the adapter answers
    instead of a new process loading it (--local: load it here anyway).
    """
    text = _read_prompt(prompt)
    ws = workspace(ctx, workspace_dir)
    from lqmf.core.registry import Registry

    Registry(ws).get(adapter)  # fail fast (and fast) on a wrong name, before any model loads
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    served = running_server_for(ws, adapter, local, "answering")
    if served is not None:
        _answer_with_server(served, adapter, text, base, raw, options, json_output)
        return
    show_phases(ctx, not json_output)
    importing()
    from lqmf.engine import inference

    model = inference.load_for_inference(ws, adapter, device=device, quantize_4bit=four_bit)
    result: dict[str, Any] = {"adapter": adapter, "task": model.task, "base_model": model.base.reference,
                              "device": model.loaded.device, "quantized_4bit": model.loaded.quantized}
    runs = [(adapter, adapter)] + ([("base", None)] if base else [])
    if model.task == "classification":
        rows = []
        for key, slot in runs:
            with inference.adapter_context(model, slot):
                probabilities = inference.classify(model, [text])[0]
            label = max(probabilities, key=probabilities.get)
            part = {"label": label, "probability": probabilities[label], "probabilities": probabilities}
            result.update(part if slot else {"base": part})
            rows.append([key if slot else f"base ({model.base.display_name})", label, f"{probabilities[label]:.4f}"])
        if json_output:
            print_json({"text": text, **result})
        else:
            print_table(rows, ["model", "label", "probability"])
        return

    ids = inference.prompt_ids(model, text, raw=raw)
    for key, slot in runs:
        if not json_output and base:
            typer.echo(f"=== {key if slot else f'base ({model.base.display_name})'} ===")
        with inference.adapter_context(model, slot):
            generation = inference.generate(model, ids, on_text=None if json_output else _write, **options)
        part = {"answer": generation.text, "finish_reason": generation.finish_reason,
                "prompt_tokens": generation.prompt_tokens, "new_tokens": generation.new_tokens,
                "seconds": round(generation.seconds, 4), "tokens_per_second": round(generation.tokens_per_second, 2)}
        result.update(part if slot else {"base": part})
        if not json_output:
            _write("\n")
            info(f"[{generation.new_tokens} tokens in {generation.seconds:.2f} s, "
                 f"{generation.tokens_per_second:.1f} tokens/s, {generation.finish_reason}]")
    if json_output:
        print_json({"prompt": text, "raw": raw, "options": options, **result})


def _answer_with_server(served: dict[str, Any], adapter: str, text: str, base: bool, raw: bool,
                        options: dict[str, Any], json_output: bool) -> None:
    """`lqmf test` answered by a running server: the same output, from its HTTP API."""
    state = served["state"]
    result: dict[str, Any] = {"adapter": adapter, "task": state.get("task"), "base_model": state.get("base_reference"),
                              "device": state.get("device"), "quantized_4bit": state.get("quantized_4bit"),
                              "server": served["url"]}
    runs = [(adapter, adapter)] + ([(f"base ({state['base']})", state["base"])] if base else [])
    rows = []
    for label, model_id in runs:
        model = ServedModel(served, model_id)
        if model.task == "classification":
            probabilities = model.classify([text])[0]
            top = max(probabilities, key=probabilities.get)
            part = {"label": top, "probability": probabilities[top], "probabilities": probabilities}
            rows.append([label, top, f"{probabilities[top]:.4f}"])
        else:
            if not json_output and base:
                typer.echo(f"=== {label} ===")
            generation = model.generate(text, raw=raw, on_text=None if json_output else _write, **options)
            part = {"answer": generation["text"], "finish_reason": generation["finish_reason"],
                    "prompt_tokens": generation["prompt_tokens"], "new_tokens": generation["new_tokens"],
                    "seconds": round(generation["seconds"], 4)}
            if not json_output:
                _write("\n")
        result.update(part if model_id == adapter else {"base": part})
    if json_output:
        print_json({("text" if state.get("task") == "classification" else "prompt"): text, **result})
    elif rows:
        print_table(rows, ["model", "label", "probability"])
