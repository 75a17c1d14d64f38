"""core/listing.py: a cached row is reused only while its files are unchanged; a damaged or older
cache file costs a recomputation, never a wrong row or an error."""

from __future__ import annotations

import json
import os
import sys

import pytest

from lqmf.core.listing import LISTING_CACHE, VERSION, ListingCache
from lqmf.core.registry import ListedAdapter, Registry
from lqmf.core.workspace import Workspace
from tests.helpers import REPO


@pytest.fixture
def registry(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from cold_start import fake_adapters
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    fake_adapters(tmp_path, 3)
    return Registry(Workspace(tmp_path))


def _rows(registry):
    return [a.json_line() for a in registry.listing()]


@pytest.mark.parametrize("damage", [
    "not json", json.dumps({"version": VERSION - 1, "rows": {}}), json.dumps({"version": VERSION, "rows": []}),
    json.dumps({"version": VERSION, "rows": {"demo-0": "x", "demo-1": [1, 2], "demo-2": ["ok", None, None, 3, []]}}),
    json.dumps({"version": VERSION, "rows": {"demo-0": ["ok", None, None, "", "files"],
                                             "demo-1": ["ok", None, None, "", [["lqmf.json", 1]]],
                                             "demo-2": ["ok", None, None, "", [["gone", 0, 0, None]]]}}),
])
def test_a_damaged_cache_is_recomputed(registry, damage):
    first = _rows(registry)
    cache = registry.workspace.root / LISTING_CACHE
    cache.write_text(damage)
    assert _rows(registry) == first
    assert json.loads(cache.read_text())["version"] == VERSION  # rewritten whole


def test_rows_are_reused_by_relative_or_full_path_until_a_file_changes(registry):
    _rows(registry)
    root, folder = registry.workspace.root, registry.root / "demo-1"
    cache = ListingCache(root, registry.root, {})
    assert cache.row(str(folder), "demo-1")[0] == "corrupt"  # outside `with`: full paths
    with cache:
        assert cache.folders_fd is not None or os.stat not in os.supports_dir_fd
        assert cache.row(str(folder), "demo-1") is not None
        (folder / "adapter_model.safetensors").write_bytes(b"x")
        assert cache.row(str(folder), "demo-1") is None
    assert cache.folders_fd is None
    changed = ListingCache(root, registry.root, {str(folder / "lqmf.json"): [0, 0, "digest"]})
    assert changed.row(str(folder), "demo-1") is None  # the checksum cache says something new of a file


@pytest.mark.parametrize(("problem", "body", "active"), [
    (None, '"task": "chat", "rank": 8', True), ('missing "lqmf.json"', "", False), ("café", '"metric": null', False)])
def test_a_listed_row_is_written_as_json_dumps_writes_it(problem, body, active):
    listed = ListedAdapter("näme", "/w/adapters/näme", "ok", problem, "tiny", body, active)
    assert listed.json_line() == json.dumps(listed.row())
