"""`lqmf test ADAPTER PROMPT`: answer one prompt with an adapter (and, with --base, its base model)."""

from __future__ import annotations

import os
import sys
from typing import Any

import typer

from lqmf.cli.common import JsonOption, WorkspaceOption, workspace
from lqmf.cli.output import info, print_json, print_table
from lqmf.cli.phases import importing, show_phases
from lqmf.core.errors import InputError
from lqmf.core.serving import API_KEY_ENV, call_server, server_with_adapter


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
    local: bool = typer.Option(False, "--local", help="Load the model in this process even when a running "
                               "`lqmf serve` of this workspace holds the adapter."),
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
    served = None if local else server_with_adapter(ws, adapter)
    if served is not None:
        info(f"answering with the running server {served['url']} (--local loads the model here instead)")
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
    state, key = served["state"], os.environ.get(API_KEY_ENV) or None
    result: dict[str, Any] = {"adapter": adapter, "task": None, "base_model": state.get("base_reference"),
                              "device": state.get("device"), "quantized_4bit": state.get("quantized_4bit"),
                              "server": served["url"]}
    runs = [(adapter, adapter)] + ([("base", state["base"])] if base else [])
    rows = []
    for key_name, model_id in runs:
        label = key_name if model_id == adapter else f"base ({state['base']})"
        if state.get("task") == "classification":
            answer = call_server(served["url"], "POST", "/v1/classify", {"model": model_id, "input": text}, key)
            top = answer["data"][0]
            part = {"label": top["label"], "probability": top["score"], "probabilities": top["probabilities"]}
            rows.append([label, top["label"], f"{top['score']:.4f}"])
        else:
            body = {"model": model_id, "max_tokens": options["max_new_tokens"], "temperature": options["temperature"],
                    "top_p": options["top_p"] or None, "seed": options["seed"]}
            if raw:
                route, body["prompt"] = "/v1/completions", text
            else:
                route, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": text}]
            answer = call_server(served["url"], "POST", route, body, key, timeout=600)
            choice = answer["choices"][0]
            words = choice["text"] if raw else choice["message"]["content"]
            part = {"answer": words, "finish_reason": choice["finish_reason"],
                    "prompt_tokens": answer["usage"]["prompt_tokens"],
                    "new_tokens": answer["usage"]["completion_tokens"]}
            if not json_output:
                if base:
                    typer.echo(f"=== {label} ===")
                typer.echo(words)
        result.update(part if model_id == adapter else {"base": part})
    result["task"] = state.get("task")
    if json_output:
        print_json({("text" if state.get("task") == "classification" else "prompt"): text, **result})
    elif rows:
        print_table(rows, ["model", "label", "probability"])
