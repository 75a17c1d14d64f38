"""The feature guide's command lines (`FT> finetune ...`, `list adapters`) and the lqmf verbs they mean.

`lqmf shell` runs them as written; the top-level CLI answers them with the verb to type instead.
"""

from __future__ import annotations

import shlex

# The guide's words -> the lqmf words that do the same; the longest match wins, the rest of the line follows.
GUIDE_PHRASES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("finetune",): ("train",),
    ("benchmark",): ("bench",),
    ("list", "adapters"): ("adapters", "list"),
    ("list", "adapter"): ("adapters", "list"),
    ("list", "models"): ("models", "list"),
    ("list", "model"): ("models", "list"),
    ("show", "adapter"): ("adapters", "show"),
    ("load", "adapter"): ("adapters", "load"),
    ("load",): ("adapters", "load"),
    ("unload", "adapter"): ("adapters", "unload"),
    ("unload",): ("adapters", "unload"),
    ("switch", "adapter"): ("adapters", "switch"),
    ("switch",): ("adapters", "switch"),
    ("export", "adapter"): ("export",),
    # continuous learning (docs/learning.md)
    ("rate",): ("feedback", "add"),
    ("list", "feedback"): ("feedback", "list"),
    ("show", "feedback"): ("feedback", "show"),
    ("export", "feedback"): ("feedback", "export"),
    ("learn", "adapter"): ("learn",),
    ("history", "adapter"): ("adapters", "history"),
    ("history",): ("adapters", "history"),
    ("rollback", "adapter"): ("adapters", "rollback"),
    ("rollback",): ("adapters", "rollback"),
}
AMBIGUOUS = {"list": ("adapters list", "models list", "feedback list")}
SHELL_ONLY = {"clear": "clears the screen", "exit": "leaves the shell", "quit": "leaves the shell"}


def translate(words: list[str]) -> list[str] | None:
    """The lqmf argument list for a guide command line, or None when the line does not start with guide words."""
    for length in (2, 1):
        key = tuple(word.lower() for word in words[:length])
        if len(key) == length and key in GUIDE_PHRASES:
            return [*GUIDE_PHRASES[key], *words[length:]]
    return None


def spelled_as_guide(words: list[str]) -> bool:
    """Whether words are an lqmf verb followed by a guide word that the verb does not take (`export adapter
    NAME PATH`: export takes NAME PATH), so that one more positional word than the verb takes follows."""
    positional = [word for word in words if not word.startswith("-")]
    return len(positional) >= 4 and tuple(w.lower() for w in positional[:2]) == ("export", "adapter")


def suggestion(words: list[str]) -> str | None:
    """One line answering a guide word typed at the top-level CLI (`lqmf finetune ...`), or None."""
    translated = translate(words)
    first = words[0].lower() if words else ""
    if translated is not None:
        return f"`lqmf {shlex.join(words)}` is the guide's spelling: did you mean `lqmf {shlex.join(translated)}`?"
    if first in AMBIGUOUS:
        options = " or ".join(f"`lqmf {verb}`" for verb in AMBIGUOUS[first])
        return f"no command '{words[0]}': did you mean {options}?"
    if first in SHELL_ONLY:
        return f"`{first}` {SHELL_ONLY[first]} in `lqmf shell`; it is not a command of its own"
    return None
