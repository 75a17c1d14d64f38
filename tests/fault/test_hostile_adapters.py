"""Adapters and leftovers that could mislead or hang the registry (issue 20): a killed combine/compress,
a crafted target_modules regex, NaN weights and NaN metrics. Each gives one clear line."""

from __future__ import annotations

import json
import signal
import time

import pytest

from lqmf.core.registry import Registry
from lqmf.core.workspace import Workspace
from tests.helpers import rewrite_adapter_weights, run_forked


def _write_nan_weights(folder, name: str = "lora_B") -> None:
    """Put a NaN into the first lora_B (or lora_A) matrix of the adapter in folder, keeping its manifest true."""

    def poison(state: dict) -> None:
        state[next(k for k in sorted(state) if f"{name}.weight" in k)][0, 0] = float("nan")

    rewrite_adapter_weights(folder, poison)


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM"])
def test_a_killed_compress_leaves_a_folder_that_says_what_it_is(fault_ws, signame):
    run = run_forked(["adapters", "compress", "good", "--rank", "4", "--in-place"], fault_ws,
                     fault=f"finalize.manifest_written:{signame}")
    assert run.returncode == -getattr(signal, signame)
    assert (fault_ws / "adapters" / ".staging-good").is_dir()
    listed = run_forked(["adapters", "list", "--json"], fault_ws)
    rows = {(row["name"], row["state"]): row for row in json.loads(listed.stdout)}
    assert rows[("good", "ok")]
    leftover = rows[("good", "broken")]["problem"]
    assert "interrupted `lqmf adapters compress`" in leftover and "--resume" not in leftover
    assert "remove --broken" in leftover
    verified = run_forked(["adapters", "verify", "--json"], fault_ws)
    reports = {report["name"]: report for report in json.loads(verified.stdout)["adapters"]}
    assert reports["good"]["ok"], reports["good"]  # the intact adapter is not the one reported failed
    assert not reports[".staging-good"]["ok"]
    assert run_forked(["adapters", "remove", "--broken", "--yes"], fault_ws).returncode == 0
    assert not (fault_ws / "adapters" / ".staging-good").exists()
    assert run_forked(["adapters", "verify", "good"], fault_ws).returncode == 0


def test_a_finished_compress_leaves_no_staging_note(fault_ws):
    run = run_forked(["adapters", "compress", "good", "--rank", "4", "--name", "small"], fault_ws)
    assert run.returncode == 0, run.stderr
    assert not list((fault_ws / "adapters").glob("*/.lqmf-staging.json"))
    assert run_forked(["adapters", "verify", "small"], fault_ws).returncode == 0


@pytest.mark.parametrize("pattern", ["(a+)+$", "(.*a){12}", "(x|x)*y", ".*.*.*.*.*.*.*.*.*.*.*.*.*z"])
def test_a_crafted_target_modules_regex_is_not_matched(fault_ws, pattern):
    folder = fault_ws / "adapters" / "good"
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = pattern
    (folder / "adapter_config.json").write_text(json.dumps(config))
    manifest = json.loads((folder / "lqmf.json").read_text())
    manifest["files"]["adapter_config.json"] = {"size": (folder / "adapter_config.json").stat().st_size}
    (folder / "lqmf.json").write_text(json.dumps(manifest))
    started = time.perf_counter()
    listed = run_forked(["adapters", "list", "--json"], fault_ws, timeout=60)
    assert time.perf_counter() - started < 30
    row = json.loads(listed.stdout)[0]
    assert row["state"] == "corrupt" and "target_modules pattern" in row["problem"], row
    loading = run_forked(["adapters", "load", "good"], fault_ws, timeout=60)
    assert "target_modules pattern" in loading.assert_clean_error(2)


def test_peft_style_target_modules_regexes_still_match(fault_ws):
    from lqmf.core.integrity import adapter_problems

    folder = fault_ws / "adapters" / "good"
    config = json.loads((folder / "adapter_config.json").read_text())
    manifest = json.loads((folder / "lqmf.json").read_text())
    for pattern, ok in ((r".*\.(q_proj|k_proj|v_proj|o_proj)", True),
                        (r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj", True), (r".*\.gate_proj", False)):
        config["target_modules"] = pattern
        (folder / "adapter_config.json").write_text(json.dumps(config))
        manifest["files"]["adapter_config.json"] = {"size": (folder / "adapter_config.json").stat().st_size}
        problems = adapter_problems(folder, manifest, full=False)
        assert (problems == []) == ok, (pattern, problems)


def test_nan_weights_are_refused_by_compress_combine_and_serve(fault_ws):
    import shutil

    shutil.copytree(fault_ws / "adapters" / "good", fault_ws / "adapters" / "other")
    _write_nan_weights(fault_ws / "adapters" / "good")
    line = run_forked(["adapters", "compress", "good", "--rank", "4", "--name", "s"], fault_ws).assert_clean_error(2)
    assert "NaN or infinite" in line and "good" in line
    line = run_forked(["adapters", "combine", "mix", "good", "other", "--method", "cat"],
                      fault_ws).assert_clean_error(2)
    assert "NaN or infinite" in line
    assert sorted(e.name for e in Registry(Workspace(fault_ws)).entries()) == ["good", "other"]  # nothing left

    from lqmf.core.errors import InputError
    from lqmf.engine.serve.host import ModelHost

    host = ModelHost.start(Workspace(fault_ws), adapters=["other"], device="cpu")
    try:
        with pytest.raises(InputError, match="NaN or infinite values"):
            host.load("good")
        assert host.complete("other", "hello", max_new_tokens=3)[1].text  # the server serves on
    finally:
        host.close()


def test_a_nan_metric_is_flagged_by_list_and_verify(fault_ws):
    path = fault_ws / "adapters" / "good" / "lqmf.json"
    manifest = json.loads(path.read_text())
    manifest["metrics"]["eval_loss"] = float("nan")
    path.write_text(json.dumps(manifest))  # NaN, as json writes it
    row = json.loads(run_forked(["adapters", "list", "--json"], fault_ws).stdout)[0]
    assert row["state"] == "suspect" and "eval_loss is nan" in row["problem"]
    assert "suspect: metric eval_loss is nan" in run_forked(["adapters", "list"], fault_ws).stdout
    verified = run_forked(["adapters", "verify", "good", "--json"], fault_ws)
    assert verified.returncode == 1
    assert any("eval_loss is nan" in p for p in json.loads(verified.stdout)["adapters"][0]["problems"])


def test_compress_at_the_adapters_rank_says_nothing_is_reduced(fault_ws):
    run = run_forked(["adapters", "compress", "good", "--rank", "16", "--name", "same"], fault_ws)
    assert run.returncode == 0, run.stderr
    assert "note: --rank 16 is the rank of good: nothing is reduced" in run.stderr
    refused = run_forked(["adapters", "compress", "good", "--rank", "1000", "--name", "big"], fault_ws)
    line = refused.assert_clean_error(2)
    assert "has rank 16, so nothing would change" in line
    assert not (fault_ws / "adapters" / "big").exists()


def test_models_list_shows_an_alias_whose_quantization_config_is_refused(fault_ws, tiny_model, cli):
    """An alias added before the check (or whose folder changed since) is listed as refused; the others stay."""
    import shutil

    folder = fault_ws.parent / "odd"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    assert cli("models", "add", "odd", str(folder)).exit_code == 0
    config["quantization_config"] = "nf4"
    (folder / "config.json").write_text(json.dumps(config))
    rows = {row["alias"]: row for row in json.loads(cli("models", "list", "--json").stdout)}
    assert "quantization_config is a str" in rows["odd"]["problem"] and len(rows) > 1
    assert "refused" in cli("models", "list").stdout
    line = run_forked(["plan", "odd"], fault_ws).assert_clean_error(2)
    assert "quantization_config is a str" in line
