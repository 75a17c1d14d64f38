"""`lqmf shell`: the guide's FT> prompt. Its command lines (`finetune`, `list adapters`, `load adapter X`...)
and every lqmf verb line run in one process, so a model loaded once answers every later `test` and
`benchmark` of its adapters."""

from __future__ import annotations

import cmd
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import typer

from lqmf.cli import guide
from lqmf.cli.common import JsonOption, WorkspaceOption, workspace
from lqmf.cli.output import fail, info
from lqmf.core.errors import LqmfError
from lqmf.core.workspace import Workspace
from lqmf.engine.model_cache import KEPT  # no torch: the engine loads only when a line needs a model

HISTORY_LENGTH = 1000
SHELL_WORDS = ("clear", "exit", "quit")
PROMPTS = ("FT>", "API>")  # the guide's prompts, pasted with its lines


def strip_prompt(line: str) -> str:
    """The line without a leading `FT> ` as the guide writes its lines."""
    for prompt in PROMPTS:
        if line.startswith(prompt):
            return line[len(prompt):].strip()
    return line


def shell_help(root: Any) -> str:
    """`help` in the shell: the guide's words, the shell's own, and the lqmf verbs."""
    rows = [(" ".join(words), "lqmf " + " ".join(verb)) for words, verb in guide.GUIDE_PHRASES.items()
            if (*words[:-1], words[-1] + "s") not in guide.GUIDE_PHRASES]  # `list adapters`, not also `list adapter`
    rows += [("test NAME \"PROMPT\"", "lqmf test NAME \"PROMPT\"")]
    rows += [(word, what) for word, what in guide.SHELL_ONLY.items()]
    width = max(len(words) for words, _ in rows) + 2
    lines = ["The guide's words (FT> prompts may be pasted with the lines):"]
    lines += [f"  {words.ljust(width)}{verb}" for words, verb in rows]
    lines += ["", "Every lqmf verb runs as a line too (help VERB for its options):"]
    lines += [f"  {name.ljust(width)}{line}" for name, line in _verb_lines(root)]
    return "\n".join(lines)


def _verb_lines(root: Any) -> list[tuple[str, str]]:
    from lqmf.cli.app import VERBS

    return [(name, VERBS[name][1]) for name in root.list_commands(None) if name in VERBS]
# Verbs that use the kept model, or no model at all; any other verb (train, serve, export...) frees it first,
# as it loads a model of its own.
KEEPS_MODEL = {"test", "bench", "adapters", "status", "models", "config", "plan", "help", "report"}
ADAPTER_VERBS = {("test",), ("bench",), ("bench", "run"), ("report",), ("report", "adapter"), ("export",),
                 ("adapters", "show"), ("adapters", "load"), ("adapters", "switch"), ("adapters", "verify"),
                 ("adapters", "rename"), ("adapters", "remove"), ("adapters", "export")}
MODEL_VERBS = {("train",), ("plan",)}
ACTIVATING = {("adapters", "load"), ("adapters", "switch")}


class LqmfShell(cmd.Cmd):
    """Reads lines (a terminal with history and tab completion, or a pipe) and runs each as `lqmf ...`."""

    def __init__(self, ws: Workspace, run_line: Callable[[list[str]], int], root: Any, *, interactive: bool,
                 json_output: bool, stop_on_error: bool):
        super().__init__()
        self.ws, self.run_line, self.root = ws, run_line, root
        self.interactive, self.json_output, self.stop_on_error = interactive, json_output, stop_on_error
        self.prompt = "FT> " if interactive else ""
        self.exit_code = 0

    # ------------------------------------------------------------------------------------- running lines

    def onecmd(self, line: str) -> bool:
        """Run one line (a guide line pasted with its `FT> ` prompt too); True ends the shell."""
        line = strip_prompt(line.strip())
        if not line or line.startswith("#"):
            return False
        try:
            words = shlex.split(line)
        except ValueError as err:
            return self._failed(fail(f"cannot read the line: {err}", 2).exit_code)
        if words[0].lower() in ("exit", "quit"):
            return True
        if words[0].lower() == "clear":
            click.clear()
            return False
        if words == ["help"] or words == ["?"]:
            typer.echo(shell_help(self.root))
            return False
        return self._failed(self.run_words(guide.translate(words) or words))

    def emptyline(self) -> bool:
        return False  # cmd's default repeats the last line

    def _failed(self, code: int) -> bool:
        if code:
            self.exit_code = code
        return bool(code) and self.stop_on_error

    def run_words(self, args: list[str]) -> int:
        """Run `lqmf ARGS` in this process; with `adapters load|switch NAME`, also load NAME here."""
        if args[0] == "shell":
            return fail("already in lqmf shell", 2).exit_code
        if self.json_output and "--json" not in args:
            args = [*args, "--json"]
        frees_model = args[0] in self.root.list_commands(None) and args[0] not in KEEPS_MODEL
        if frees_model or tuple(args[:2]) == ("adapters", "unload"):
            KEPT.release()
        try:
            code = self.run_line(["--workspace", str(self.ws.root), *args])
            if code == 0 and tuple(args[:2]) in ACTIVATING and len(args) > 2 and not args[2].startswith("-"):
                self.preload(args[2])
        except KeyboardInterrupt:
            code = fail("interrupted", 130).exit_code
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except LqmfError as err:
            code = fail(err.message, err.exit_code).exit_code
        except Exception as err:  # noqa: BLE001 - one line, and the shell goes on
            code = fail(f"{type(err).__name__}: {err}", 1).exit_code
        return code

    def preload(self, adapter: str) -> None:
        """Load the adapter's model into this process for later `test` and `benchmark` lines, unless a
        running `lqmf serve` of this workspace already serves its base (one copy of a model is enough)."""
        from lqmf.core.registry import Registry
        from lqmf.core.serving import running_servers

        registry = Registry(self.ws)
        base_id = registry.summary(registry.get(adapter))["base_id"]
        served = [s["url"] for s in running_servers(self.ws) if s.get("base_id") == base_id]
        if served:
            info(f"{adapter} is served by {served[0]}: not loading its model in this shell too")
            return
        info(f"loading {adapter} into this shell for test and benchmark ...")
        started = time.perf_counter()
        from lqmf.engine import inference

        inference.load_for_inference(self.ws, adapter)
        info(f"loaded {adapter} in {time.perf_counter() - started:.1f} s")

    # ----------------------------------------------------------------------------------- tab completion

    def completenames(self, text: str, *ignored: Any) -> list[str]:
        words = {*self.root.list_commands(None), *(phrase[0] for phrase in guide.GUIDE_PHRASES), *SHELL_WORDS}
        return sorted(word + " " for word in words if word.startswith(text))

    def completedefault(self, text: str, line: str, begidx: int, endidx: int) -> list[str]:
        try:
            words = shlex.split(line[:begidx])
        except ValueError:
            return []
        return sorted(f"{choice} " for choice in self._choices(words, text) if choice.startswith(text))

    def _choices(self, words: list[str], text: str) -> list[str]:
        """What may come next after words: a guide word, a subcommand, an option, an adapter or a model."""
        follows = {phrase[len(words)] for phrase in guide.GUIDE_PHRASES
                   if len(phrase) > len(words) and list(phrase[:len(words)]) == [w.lower() for w in words]}
        follows -= {word[:-1] for word in follows}  # offer `adapters`, not also its singular spelling
        args = guide.translate(words) or words
        command, path = self._command(args)
        if text.startswith("-") and command is not None:
            return [opt for param in command.params for opt in param.opts if opt.startswith("--")]
        choices = list(follows)
        if path == tuple(args) and hasattr(command, "list_commands"):
            choices += command.list_commands(None)
        names = tuple(arg for arg in args if not arg.startswith("-"))
        if path in ADAPTER_VERBS or names in {("bench",), ("report",)}:
            choices += [entry.name for entry in _registry(self.ws).entries()]
        if path in MODEL_VERBS and len(names) == len(path):
            choices += _model_aliases(self.ws)
        return choices

    def _command(self, args: list[str]) -> tuple[Any, tuple[str, ...]]:
        """The deepest command that args name, and the words naming it."""
        command, path = self.root, ()
        for arg in args:
            sub = command.get_command(None, arg) if hasattr(command, "get_command") else None
            if sub is None:
                break
            command, path = sub, (*path, arg)
        return command, path

    # ----------------------------------------------------------------------------------------- the loop

    def read_line(self) -> str | None:
        """The next line, or None at Ctrl-D or the end of piped input (a line `EOF` is a line like others)."""
        if self.interactive:
            try:
                return input(self.prompt)
            except EOFError:
                typer.echo("")
                return None
        line = sys.stdin.readline()
        return line if line else None

    def read_lines(self, readline: Any) -> None:
        """cmd.Cmd's loop, but the end of input is not the line `EOF`."""
        previous = None
        if readline is not None:
            previous = readline.get_completer()
            readline.set_completer(self.complete)
            readline.parse_and_bind("tab: complete")
        try:
            while (line := self.read_line()) is not None:
                if self.onecmd(line):
                    break
        finally:
            if readline is not None:
                readline.set_completer(previous)

    def loop(self) -> int:
        """Read and run lines until exit, Ctrl-D or the end of input; Ctrl-C cancels the line being typed."""
        history = _history_file(self.ws) if self.interactive else None
        readline = _readline(history) if self.interactive else None
        while True:
            try:
                self.read_lines(readline)
                break
            except KeyboardInterrupt:  # the terminal has echoed ^C: a fresh prompt
                typer.echo("")
        if readline is not None and history is not None:
            try:
                history.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(str(history))
            except OSError as err:
                info(f"note: history not saved to {history}: {err.strerror}")
        return self.exit_code


def _registry(ws: Workspace):
    from lqmf.core.registry import Registry

    return Registry(ws)


def _model_aliases(ws: Workspace) -> list[str]:
    from lqmf.core.models import ModelCatalogue

    try:
        return list(ModelCatalogue(ws).models)
    except LqmfError:
        return []


def _history_file(ws: Workspace) -> Path:
    return ws.root / ".lqmf" / "shell_history"


def _readline(history: Path | None) -> Any:
    """readline with the history loaded and '-' kept inside words (adapter names), or None without it."""
    try:
        import readline
    except ImportError:
        return None
    readline.set_completer_delims(" \t\n\"'")
    readline.set_history_length(HISTORY_LENGTH)
    if history is not None and history.is_file():
        try:
            readline.read_history_file(str(history))
        except OSError:
            pass
    return readline


def shell(
    ctx: typer.Context,
    stop_on_error: bool = typer.Option(False, "--stop-on-error", "-e",
                                       help="Stop at the first line that fails (for scripts)."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """An FT> prompt that runs the guide's commands (`finetune`, `list adapters`, `load adapter NAME`,
    `test NAME "..."`, `benchmark NAME`, `clear`, `help`...) and every lqmf verb line, in one process:
    a model loaded by `load adapter` or a first `test` answers the later ones without loading again.

    Reads a script from a pipe too (`lqmf shell < script.ft`): no prompt, every line runs, and the
    exit code is that of the last line that failed (0 when none did). With --json every line prints JSON.
    """
    ws = workspace(ctx, workspace_dir)
    root = ctx.find_root().command
    KEPT.keep(report=info)
    interactive = sys.stdin.isatty()
    if interactive:
        info("lqmf shell: the guide's commands and every lqmf verb; help, Tab to complete, Ctrl-D to leave")
    code = LqmfShell(ws, root.run_line, root, interactive=interactive, json_output=json_output,
                     stop_on_error=stop_on_error).loop()
    raise typer.Exit(code)
