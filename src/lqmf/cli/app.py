"""The `lqmf` command: the root app and its verbs, each imported only when it runs.

`lqmf --help` and the registry verbs start in about the time Python takes to import Typer
(docs/cli.md): a verb's module, and whatever it imports, loads only when that verb is named,
and heavy libraries (torch, transformers, peft...) only inside command bodies.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from lqmf import __version__
from lqmf.cli import guide
from lqmf.cli.common import JsonOption, WorkspaceOption
from lqmf.cli.output import DEBUG_ENV, App, errors_as_json, fail, print_json

# verb -> ("module:attribute" of its Typer app or command function, one line for `lqmf --help`).
# Adding a verb is one line here; its module is imported only when the verb runs.
VERBS: dict[str, tuple[str, str]] = {
    "train": ("lqmf.cli.train_cmd:train", "Fine-tune a LoRA/QLoRA adapter into adapters/NAME."),
    "plan": ("lqmf.cli.plan_cmd:plan", "Will a LoRA/QLoRA run fit in memory? (from config.json alone)"),
    "status": ("lqmf.cli.status_cmd:status", "GPUs, CPU, RAM, disk, library versions, adapters, servers."),
    "test": ("lqmf.cli.infer_cmd:answer", "Answer one prompt with an adapter (--base: its base too)."),
    "serve": ("lqmf.cli.serve_cmd:serve", "Serve a base model and hot-swappable adapters (OpenAI API)."),
    "export": ("lqmf.cli.export_cmd:export", "Export an adapter: PEFT, merged, GGUF (llama.cpp/Ollama), vLLM."),
    "config": ("lqmf.cli.config_cmd:app", "Create, show, validate and edit training configs."),
    "models": ("lqmf.cli.models_cmd:app", "List and add base models; build a tiny test model."),
    "bench": ("lqmf.cli.bench_cmd:app", "Benchmark an adapter (speed, memory, quality); compare results."),
    "report": ("lqmf.cli.report_cmd:app", "Markdown and HTML reports with plots, from saved results."),
    "adapters": ("lqmf.cli.adapters_cmd:app", "List, show, load/switch/unload, verify, rename, remove adapters."),
    "tune": ("lqmf.cli.tune_cmd:tune", "Search hyperparameters (Optuna) on one loaded base; keep the best."),
    "federated": ("lqmf.cli.federated_cmd:app", "Federated fine-tuning (Flower): server, client, simulate."),
    "feedback": ("lqmf.cli.feedback_cmd:app", "Rate and correct recorded answers; list, show, export, purge."),
    "learn": ("lqmf.cli.learn_cmd:learn", "Train ADAPTER-vN on its users' corrections; --promote hot-swaps it."),
    "shell": ("lqmf.cli.shell_cmd:shell", "An FT> prompt for the guide's commands, in one process."),
    "help": ("lqmf.cli.app:help_command", "Show the help of lqmf or of a verb: lqmf help adapters list."),
}


def load_verb(name: str) -> Any:
    """Import a verb's module and build its click command (a group for a Typer app, whose subcommands
    are built when named)."""
    module_name, attribute = VERBS[name][0].split(":")
    target = getattr(importlib.import_module(module_name), attribute)
    if isinstance(target, typer.Typer):
        from lqmf.engine.compat import typer_group_and_builders  # no torch in it

        lazy = typer_group_and_builders(target)
        if lazy is not None:  # a group (an App's: LazySubcommands) that builds a subcommand when named
            group, builders = lazy
            group.builders = builders
            group.name = name
            return group
    else:
        single = App()
        single.command(name)(target)
        target = single
    command = typer.main.get_command(target)
    command.name = name
    return command


class LazyVerbs(TyperGroup):
    """The root group: verbs from VERBS, imported on demand; guide words answered with the verb to use."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return [*VERBS, *(name for name in self.commands if name not in VERBS)]

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any:
        if cmd_name not in self.commands and cmd_name in VERBS:
            self.commands[cmd_name] = load_verb(cmd_name)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: typer.Context, formatter: Any) -> None:
        """The listing from VERBS' one-liners, without importing any verb."""
        with formatter.section("Commands"):
            formatter.write_dl([(name, line) for name, (_, line) in VERBS.items()])

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as err:
            from lqmf.engine.compat import no_such_option_error  # imported only on an error (no torch in it)

            if isinstance(err, no_such_option_error()):  # Typer offers any option sharing a few letters
                err.possibilities = _close_options(err.option_name, err.possibilities or [])  # (--bogus: --gpus)
            raise

    def resolve_command(self, ctx: typer.Context, args: list[str]) -> Any:
        if guide.spelled_as_guide(args):  # `lqmf export adapter NAME PATH`: a verb, then the guide's word
            raise fail(guide.suggestion(args), 2)
        if args and not args[0].startswith("-") and self.get_command(ctx, args[0]) is None:
            message = guide.suggestion(args) or (
                f"no command '{args[0]}'" + _closest(args[0]) + "; lqmf --help lists them")
            raise fail(message, 2)
        return super().resolve_command(ctx, args)

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        if standalone_mode and "--json" in args:
            sys.exit(self.run_line(args, prog_name or "lqmf"))
        return super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                            standalone_mode=standalone_mode, **extra)

    def run_line(self, args: list[str], prog_name: str = "lqmf") -> int:
        """Run one command line in this process; returns its exit code. A usage error prints one line
        (with --json: {"error", "exit_code"} on stdout, as every other error does)."""
        with errors_as_json("--json" in args):
            try:
                result = super().main(args=args, prog_name=prog_name, standalone_mode=False)
            except typer.Abort:
                return 1
            except Exception as err:  # Click's usage errors carry format_message() and exit_code
                if not (hasattr(err, "format_message") and isinstance(getattr(err, "exit_code", None), int)):
                    raise
                fail(err.format_message(), err.exit_code)
                return err.exit_code
        return result if isinstance(result, int) else 0


def _close_options(option: str, options: list[str]) -> list[str]:
    """The options spelled much like option (compared without their dashes), closest first."""
    bare = {name.lstrip("-"): name for name in options}
    return [bare[name] for name in difflib.get_close_matches(option.lstrip("-"), list(bare), n=2, cutoff=0.75)]


def _closest(word: str) -> str:
    words = [*VERBS, *(" ".join(phrase) for phrase in guide.GUIDE_PHRASES)]
    close = difflib.get_close_matches(word, words, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


app = App(
    name="lqmf",
    cls=LazyVerbs,
    add_completion=True,
    help="LQMF, the Local Quantized Model Factory: LoRA/QLoRA fine-tuning on small GPUs, "
    "and the adapters it makes: manage, serve, test, benchmark, export.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lqmf {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    workspace: str | None = WorkspaceOption,
    debug: bool = typer.Option(False, "--debug", envvar=DEBUG_ENV, help="Show tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    ctx.obj = {"workspace": workspace}
    if debug:
        os.environ[DEBUG_ENV] = "1"


def help_command(
    ctx: typer.Context,
    words: list[str] = typer.Argument(None, help="A verb and subcommand (or the guide's words), e.g. adapters list."),
    json_output: bool = JsonOption,
) -> None:
    """Show the help of lqmf, or of a verb: `lqmf help`, `lqmf help adapters list`, `lqmf help finetune`."""
    words = list(words or [])
    words = guide.translate(words) or words
    context = ctx.find_root()
    command = context.command
    for word in words:
        sub = command.get_command(context, word) if hasattr(command, "get_command") else None
        if sub is None:
            raise fail(f"no command '{' '.join(words)}'; lqmf --help lists them", 2)
        context = typer.Context(sub, info_name=word, parent=context)
        command = sub
    if json_output:
        print_json({"command": " ".join(["lqmf", *words]), "help": command.get_help(context)})
        return
    typer.echo(command.get_help(context))


def main() -> None:
    app(prog_name="lqmf")


if __name__ == "__main__":
    sys.exit(main())
