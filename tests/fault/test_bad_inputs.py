"""The bad-input corpus: datasets, configs, names, model references, export targets and corrupted
adapters, each through the CLI. Every case must exit with its code, print exactly one `error:` line
and no traceback, and leave the workspace as it was (no adapter lost, no stray or half file)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import EXAMPLES, snapshot

Prepare = Callable[[Path, Path], list[str]]  # (workspace, tiny model) -> the command line


@dataclass
class Case:
    id: str
    prepare: Prepare
    code: int
    says: str = ""  # a piece of the error line


CASES: list[Case] = []


def case(id_: str, code: int, says: str = ""):
    def register(prepare: Prepare) -> Prepare:
        CASES.append(Case(id_, prepare, code, says))
        return prepare
    return register


def add(id_: str, code: int, args: list[str] | Callable[[Path, Path], list[str]], says: str = "") -> None:
    CASES.append(Case(id_, args if callable(args) else (lambda ws, model, a=args: list(a)), code, says))


# ----------------------------------------------------------------------------- datasets

def dataset_case(id_: str, filename: str, content: str | bytes, task: str, says: str, code: int = 2) -> None:
    def prepare(ws: Path, model: Path) -> list[str]:
        path = ws / filename
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return ["train", str(model), filename, task, "--name", "d", "--dry-run"]
    CASES.append(Case(f"dataset-{id_}", prepare, code, says))


dataset_case("empty-csv", "e.csv", "", "chat", "empty")
dataset_case("header-only", "h.csv", "input,output\n", "chat", "no data rows")
dataset_case("missing-column", "m.csv", "input,answer\nhi,there\n", "chat", "output")
dataset_case("empty-output", "eo.csv", "input,output\nhi,\nyo,ok\n", "chat", "")
dataset_case("malformed-csv", "mf.csv", 'input,output\n"hi,there\n', "chat", "")
dataset_case("binary", "b.csv", bytes(range(256)) * 4, "chat", "")
dataset_case("utf16", "u.csv", "input,output\nhi,there\n".encode("utf-16"), "chat", "")
dataset_case("txt-suffix", "d.txt", "hello\n", "chat", "unsupported file type")
dataset_case("no-suffix", "data", "hello\n", "chat", "unsupported file type")
dataset_case("jsonl-bad-line", "j.jsonl", '{"input": "a", "output": "b"}\n{"input": \n', "chat", "line 2")
dataset_case("jsonl-not-object", "jo.jsonl", '["a", "b"]\n', "chat", "line 1")
dataset_case("jsonl-blank-only", "jb.jsonl", "\n\n\n", "chat", "")
dataset_case("json-not-list", "jn.json", '{"input": "a"}', "chat", "")
dataset_case("json-invalid", "ji.json", "[{", "chat", "")
dataset_case("messages-bad-role", "r.jsonl",
             '{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n', "chat", "")
dataset_case("messages-not-list", "ml.jsonl", '{"messages": "hello"}\n', "chat", "")
dataset_case("messages-no-assistant", "na.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', "chat", "")
dataset_case("content-not-text", "ct.jsonl",
             '{"messages": [{"role": "user", "content": {"a": 1}}, {"role": "assistant", "content": "x"}]}\n', "chat",
             "")
dataset_case("instruction-missing", "im.jsonl", '{"input": "a", "output": "b"}\n', "instruction", "instruction")
dataset_case("summary-missing", "sm.csv", "text\nsome text\n", "summarization", "summary")
dataset_case("one-label", "ol.csv", "text,label\na,pos\nb,pos\nc,pos\n", "classification", "")
dataset_case("empty-label", "el.csv", "text,label\na,pos\nb,\nc,neg\n", "classification", "")
dataset_case("token-ids-not-ints", "ti.jsonl", '{"input_ids": ["a", "b"]}\n', "chat", "")
dataset_case("token-ids-out-of-vocab", "tv.jsonl", '{"input_ids": [1, 2, 99999999]}\n' * 8, "chat", "vocabulary")
add("dataset-missing-file", 3, lambda ws, model: ["train", str(model), "nope.csv", "chat", "--dry-run"], "not found")
add("dataset-is-a-folder", 3, lambda ws, model: ["train", str(model), "adapters", "chat", "--dry-run"])
add("dataset-unknown-task", 2, lambda ws, model: ["train", str(model), str(EXAMPLES / "chat_training.csv"), "chatt",
                                                  "--dry-run"], "did you mean 'chat'")

# ----------------------------------------------------------------------------- configs


def train_with(*options: str) -> Callable[[Path, Path], list[str]]:
    return lambda ws, model: ["train", str(model), str(EXAMPLES / "chat_training.csv"), "chat", "--name", "c",
                              "--dry-run", *options]


for key, value, says in [
    ("max_steps", "-5", "max_steps"), ("max_steps", "0", "max_steps"), ("num_train_epochs", "nan", "finite"),
    ("num_train_epochs", "inf", "finite"), ("num_train_epochs", "-1", "num_train_epochs"),
    ("learning_rate", "nan", "finite"), ("learning_rate", "0", "learning_rate"), ("learning_rate", "7", "at most 1"),
    ("lora_r", "0", "lora_r"), ("lora_r", "1e9", "lora_r"), ("lora_r", "many", "integer"), ("lora_r", "2.5", "integer"),
    ("lora_alpha", "-4", "lora_alpha"), ("lora_dropout", "1", "lora_dropout"), ("lora_dropout", "nan", "finite"),
    ("per_device_train_batch_size", "0", "per_device_train_batch_size"),
    ("gradient_accumulation_steps", "-2", "gradient_accumulation_steps"), ("max_seq_length", "0", "max_seq_length"),
    ("warmup_ratio", "1.5", "warmup_ratio"), ("weight_decay", "-1", "weight_decay"),
    ("max_grad_norm", "inf", "finite"), ("seed", "-7", "seed"), ("validation_split", "1", "validation_split"),
    ("eval_steps", "-1", "eval_steps"), ("save_steps", "-3", "save_steps"), ("logging_steps", "0", "logging_steps"),
    ("use_4bit_quantization", "maybe", "true or false"), ("lr_scheduler_type", "cosin", "did you mean 'cosine'"),
    ("overlong", "chop", "overlong"), ("device", "tpu", "device"), ("max_memory", "7.5XB", "max_memory"),
    ("target_modules", "[]", "target_modules"), ("lora_rank", "8", "did you mean 'lora_r'"),
    ("eval_strategy", "sometimes", "eval_strategy"), ("job_name", "../x", "job_name"),
]:
    add(f"config-{key}={value}", 2, train_with("--set", f"{key}={value}"), says)
add("config-set-no-equals", 2, train_with("--set", "lora_r"), "key=value")
add("config-steps-without-eval-steps", 2, train_with("--set", "eval_strategy=steps"), "eval_steps")
add("option-max-steps-negative", 2, train_with("--max-steps", "-5"), "max_steps")
add("option-lr-nan", 2, train_with("--lr", "nan"), "learning_rate")
add("option-epochs-inf", 2, train_with("--epochs", "inf"), "num_train_epochs")


def config_file_case(id_: str, text: str, says: str, code: int = 2) -> None:
    def prepare(ws: Path, model: Path) -> list[str]:
        (ws / "configs").mkdir(exist_ok=True)
        (ws / "configs" / "bad.yaml").write_text(text)
        return train_with("--config", "bad")(ws, model)
    CASES.append(Case(f"config-file-{id_}", prepare, code, says))


config_file_case("yaml-syntax", "lora_r: [1\n", "line")
config_file_case("not-mapping", "- a\n- b\n", "mapping")
config_file_case("nan-epochs", "num_train_epochs: .nan\n", "finite")
config_file_case("unknown-key", "lora_rank: 8\n", "lora_r")
config_file_case("not-utf8", "lora_r: \udcff\n".encode("utf-8", "surrogateescape").decode("latin-1"), "")
add("config-file-missing", 3, train_with("--config", "nothere"), "not found")
add("config-validate-missing", 3, ["config", "validate", "nothere"], "not found")

# ----------------------------------------------------------------------------- names

for bad in ["../evil", "/tmp/evil", "a/b", "..", ".hidden", "x" * 101, "a b"]:
    add(f"config-create-{bad[:12]}", 2, ["config", "create", bad])
for verb in (["adapters", "show"], ["adapters", "load"], ["adapters", "remove", "--yes"], ["adapters", "verify"],
             ["test"], ["export"]):
    for bad in ["../escape", "a/b", ".hidden"]:
        def args(ws, model, verb=verb, bad=bad):
            if verb == ["adapters", "remove", "--yes"]:
                return ["adapters", "remove", bad, "--yes"]
            if verb == ["test"]:
                return ["test", bad, "hello"]
            if verb == ["export"]:
                return ["export", bad, str(ws.parent / "out")]
            return [*verb, bad]
        add(f"name-{'-'.join(verb[:2])}-{bad}", 2, args)
add("name-rename-to-bad", 2, ["adapters", "rename", "good", "../x"])
add("name-rename-missing", 3, ["adapters", "rename", "nobody", "x"], "not found")
add("name-rename-to-itself", 2, ["adapters", "rename", "good", "good"])
add("name-train-bad-name", 2, lambda ws, model: ["train", str(model), str(EXAMPLES / "chat_training.csv"), "chat",
                                                 "--name", "../evil", "--dry-run"], "job_name")
add("name-train-exists", 4, lambda ws, model: ["train", str(model), str(EXAMPLES / "chat_training.csv"), "chat",
                                               "--name", "good", "--dry-run"], "already exists")
add("name-resume-missing", 3, ["train", "--resume", "nobody"], "no unfinished run")
add("name-remove-missing", 3, ["adapters", "remove", "nobody", "--yes"], "not found")
add("name-show-missing", 3, ["adapters", "show", "goood"], "did you mean 'good'")

for bad in ["a\n", "good\n"]:  # a pattern's $ matches before a final newline: fullmatch refuses these
    add(f"name-newline-config-create-{bad[:-1]}", 2, ["config", "create", bad], "not allowed")
    add(f"name-newline-rename-{bad[:-1]}", 2, ["adapters", "rename", "good", bad], "not allowed")
    add(f"name-newline-models-add-{bad[:-1]}", 2, lambda ws, model, bad=bad: ["models", "add", bad, str(model)],
        "not allowed")

# ----------------------------------------------------------------------------- combine and compress options


def with_copy(*args: str) -> Callable[[Path, Path], list[str]]:
    """args, after copying adapter 'good' to 'good2' (two adapters to combine)."""
    def prepare(ws: Path, model: Path) -> list[str]:
        import shutil

        shutil.copytree(ws / "adapters" / "good", ws / "adapters" / "good2")
        return list(args)
    return prepare


for weights in ("nan,1", "1,inf", "-inf,1", "1e39,1", "101,1"):
    add(f"combine-weights-{weights}", 2, with_copy("adapters", "combine", "mix", "good", "good2", "--weights", weights),
        "--weights")
for option, value in (("--max-loss", "nan"), ("--max-loss", "inf"), ("--min-metric", "nan")):
    add(f"combine-{option[2:]}-{value}", 2, with_copy("adapters", "combine", "mix", "good", "good2", option, value),
        option)
add("compress-rank-not-below", 2, ["adapters", "compress", "good", "--rank", "1000", "--name", "small"],
    "nothing would change")
add("compress-rank-above", 2, ["adapters", "compress", "good", "--rank", "17", "--name", "small"], "has rank 16")
add("compress-max-loss-nan", 2, ["adapters", "compress", "good", "--rank", "4", "--name", "s", "--max-loss", "nan"],
    "--max-loss")

# ----------------------------------------------------------------------------- odd pre-quantized configs


def quantized_model(quantization) -> Callable[[Path, Path], Path]:
    """A copy of the tiny model whose config.json carries quantization as its quantization_config."""
    def make(ws: Path, model: Path) -> Path:
        import shutil

        folder = ws / "odd-quant"
        shutil.copytree(model, folder)
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = quantization
        (folder / "config.json").write_text(json.dumps(config))  # json writes NaN as NaN, as a broken tool might
        return folder
    return make


ODD_QUANTIZATION = {
    "string": ("nf4", "quantization_config is a str"),
    "bnb-type-bogus": ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "bogus"},
                       "bnb_4bit_quant_type"),
    "gptq-bits-nan": ({"quant_method": "gptq", "bits": float("nan")}, "quantization_config.bits"),
    "awq-bits-text": ({"quant_method": "awq", "w_bit": "four"}, "quantization_config.w_bit"),
}
for id_, (quantization, says) in ODD_QUANTIZATION.items():
    make = quantized_model(quantization)
    add(f"quant-{id_}-models-add", 2, lambda ws, model, make=make: ["models", "add", "oq", str(make(ws, model))], says)
    add(f"quant-{id_}-plan", 2, lambda ws, model, make=make: ["plan", str(make(ws, model))], says)
    add(f"quant-{id_}-dry-run", 2, lambda ws, model, make=make: ["train", str(make(ws, model)),
                                                                  str(EXAMPLES / "chat_training.csv"), "chat",
                                                                  "--name", "q", "--dry-run"], says)

# ----------------------------------------------------------------------------- model references


@case("model-folder-without-config", 2, "no config.json")
def _empty_model(ws: Path, model: Path) -> list[str]:
    (ws / "empty-model").mkdir()
    return ["train", "empty-model", str(EXAMPLES / "chat_training.csv"), "chat", "--dry-run"]


@case("model-config-not-json", 2, "config.json")
def _bad_config_model(ws: Path, model: Path) -> list[str]:
    (ws / "bad-model").mkdir()
    (ws / "bad-model" / "config.json").write_text("{not json")
    return ["train", "bad-model", str(EXAMPLES / "chat_training.csv"), "chat", "--dry-run"]


@case("serve-folder-without-config", 2, "no config.json")
def _serve_empty(ws: Path, model: Path) -> list[str]:
    (ws / "empty-model").mkdir()
    return ["serve", "--model", "empty-model", "--port", "0"]


@case("plan-folder-without-config", 2, "no config.json")
def _plan_empty(ws: Path, model: Path) -> list[str]:
    (ws / "empty-model").mkdir()
    return ["plan", "empty-model"]


add("model-unknown-alias", 3, ["train", "no-such-model", str(EXAMPLES / "chat_training.csv"), "chat", "--dry-run"],
    "unknown model")
add("model-a-file", 3, ["train", str(EXAMPLES / "chat_training.csv"), str(EXAMPLES / "chat_training.csv"), "chat",
                        "--dry-run"])
add("serve-nothing", 2, ["serve"], "--model")
add("serve-missing-adapter", 3, ["serve", "--adapter", "nobody", "--port", "0"], "not found")

# ----------------------------------------------------------------------------- export targets

add("export-unwritable-proc", 2, ["export", "good", "/proc/lqmf-nope/out"], "cannot")
add("export-under-a-file", 2, lambda ws, model: ["export", "good", str(ws / "adapters" / "good" / "lqmf.json" / "x")])
add("export-into-registry", 2, ["export", "good", "adapters/inside"], "inside the adapter registry")
add("export-over-workspace", 2, lambda ws, model: ["export", "good", str(ws.parent), "--force"], "workspace")
add("export-empty-path", 2, ["export", "good", " "], "empty")
add("export-archive-suffix", 2, lambda ws, model: ["export", "good", str(ws.parent / "x.zip"), "--archive"],
    ".tar.gz")


@case("export-over-existing-file", 4, "already exists")
def _existing_file(ws: Path, model: Path) -> list[str]:
    (ws.parent / "taken").write_text("mine")
    return ["export", "good", str(ws.parent / "taken")]


@case("export-force-over-foreign-folder", 4, "not an LQMF export")
def _foreign(ws: Path, model: Path) -> list[str]:
    (ws.parent / "foreign").mkdir()
    (ws.parent / "foreign" / "keep.txt").write_text("mine")
    return ["export", "good", str(ws.parent / "foreign"), "--force"]


@case("export-force-over-another-registrys-adapter", 4, "it is an adapter folder")
def _other_registry(ws: Path, model: Path) -> list[str]:
    import shutil

    theirs = ws.parent / "other-ws" / "adapters" / "good"
    shutil.copytree(ws / "adapters" / "good", theirs)
    return ["export", "good", str(theirs), "--force"]


@case("export-runtime-refuses-a-dora-adapter", 2, "DoRA adapter")
def _dora(ws: Path, model: Path) -> list[str]:
    import hashlib
    import json

    folder = ws / "adapters" / "good"
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    manifest = json.loads((folder / "lqmf.json").read_text())
    data = (folder / "adapter_config.json").read_bytes()
    manifest["files"]["adapter_config.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "lqmf.json").write_text(json.dumps(manifest))
    return ["export", "good", str(ws.parent / "gguf"), "--format", "gguf"]


@case("export-unwritable-folder", 2, "")
def _read_only(ws: Path, model: Path) -> list[str]:
    folder = ws.parent / "ro"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: a read-only file system stands in
        return ["export", "good", "/sys/lqmf-nope"]
    folder.chmod(0o555)
    return ["export", "good", str(folder / "out")]

# ----------------------------------------------------------------------------- corrupted adapters


def corrupt(id_: str, damage: Callable[[Path], None], says: str, code: int = 2) -> None:
    for verb in ("test", "export", "bench", "load", "switch"):
        def prepare(ws: Path, model: Path, verb=verb) -> list[str]:
            damage(ws / "adapters" / "good")
            return {"test": ["test", "good", "hello", "--max-new-tokens", "2"],
                    "export": ["export", "good", str(ws.parent / "out")],
                    "bench": ["bench", "good", "--max-new-tokens", "2", "--warmup", "0"],
                    "load": ["adapters", "load", "good"], "switch": ["adapters", "switch", "good"]}[verb]
        CASES.append(Case(f"corrupt-{id_}-{verb}", prepare, code, says))


def _truncate(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:4000])


def _random_bytes(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    path.write_bytes(os.urandom(path.stat().st_size))


def _flip_last_byte(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_config(key: str, value) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / "adapter_config.json"
        config = json.loads(path.read_text())
        config[key] = value
        path.write_text(json.dumps(config))
        manifest = json.loads((folder / "lqmf.json").read_text())  # as if the manifest were updated too
        manifest["files"]["adapter_config.json"] = {"size": path.stat().st_size}
        (folder / "lqmf.json").write_text(json.dumps(manifest))
    return damage


def _rank_in_place(folder: Path) -> None:
    """r 16 -> 32 (same size, so only the check against the weights' shapes can tell)."""
    path = folder / "adapter_config.json"
    text = path.read_text()
    path.write_text(text.replace('"r": 16', '"r": 32'))


def _remove_weights(folder: Path) -> None:
    (folder / "adapter_model.safetensors").unlink()


corrupt("truncated", _truncate, "corrupt")
corrupt("random-bytes", _random_bytes, "corrupt")
corrupt("flipped-byte", _flip_last_byte, "corrupt")
corrupt("rank-edited", _rank_in_place, "corrupt")
corrupt("rank-edited-with-manifest", _edit_config("r", 8), "corrupt")
corrupt("targets-edited", _edit_config("target_modules", ["q_proj"]), "corrupt")
corrupt("weights-missing", _remove_weights, "broken", code=3)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, fault_ws: Path, tiny_model: Path, cli):
    args = case.prepare(fault_ws, tiny_model)
    before = snapshot(fault_ws)
    outside = sorted(p.name for p in fault_ws.parent.iterdir())
    result = cli(*args)
    assert result.exit_code == case.code, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert case.says in errors[0], errors[0]
    assert snapshot(fault_ws) == before, "the workspace changed"
    assert sorted(p.name for p in fault_ws.parent.iterdir()) == outside, "a stray file beside the workspace"


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 100
