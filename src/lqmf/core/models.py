"""Model aliases: the built-in catalogue overlaid with the workspace's configs/models.yaml.

A model reference is an alias, a local folder, a hub id (org/name) or package:<module>/<subdir>
(a model shipped inside an installed Python package).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lqmf.core.errors import ConflictError, InputError, NotFoundError, RuntimeFailure, did_you_mean
from lqmf.core.fsutil import atomic_write_text
from lqmf.core.names import validate_name
from lqmf.core.workspace import Workspace

BUILTIN_CATALOGUE = Path(__file__).with_name("builtin_models.yaml")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model reference points and what LQMF knows about its family."""

    reference: str
    source: str
    kind: str  # local | hub | package
    path: Path | None
    family: str | None
    target_modules: list[str] | None = None
    chat_template: str | None = None
    alias: str | None = None
    config: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def load_id(self) -> str:
        """What to pass to from_pretrained."""
        return str(self.path) if self.path is not None else self.source

    @property
    def available(self) -> bool:
        return self.path is not None and (self.path / "config.json").is_file()

    @property
    def display_name(self) -> str:
        return self.alias or (self.path.name if self.path is not None else self.source)

    @property
    def quantization(self) -> dict[str, Any] | None:
        """How the saved weights are quantized (config.json's quantization_config), None when they are not."""
        return quantization_of(self.config, str(self.path / "config.json") if self.path else self.reference)

    @property
    def prequantized_4bit(self) -> bool:
        quant = self.quantization
        return bool(quant and quant["bits"] == 4)


# Pre-quantized formats: quant_method -> (module transformers needs, what to pip install).
QUANT_LOADERS = {
    "bitsandbytes": ("bitsandbytes", "bitsandbytes"),
    "gptq": ("gptqmodel", "gptqmodel optimum"),
    "awq": ("awq", "autoawq"),
}


BNB_4BIT_TYPES = ("nf4", "fp4")
QUANT_BITS = (2, 3, 4, 8)


def quantization_of(config: dict[str, Any], where: str = "config.json") -> dict[str, Any] | None:
    """{method, bits, kind, label} from a model's config.json quantization_config; None when absent.
    A quantization_config LQMF could not load is refused here (InputError naming where and the key), so
    `models add`, `plan` and `train --dry-run` fail as `train` would."""
    quant = config.get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise InputError(f"{where}: quantization_config is a {type(quant).__name__}, not a mapping")
    method = str(quant.get("quant_method") or "unknown").lower()
    if method == "bitsandbytes":
        four = quant.get("load_in_4bit") or quant.get("_load_in_4bit")
        bits = 4 if four else 8
        kind = (quant.get("bnb_4bit_quant_type") or "nf4") if four else "int8"
        if four and kind not in BNB_4BIT_TYPES:
            raise InputError(f"{where}: quantization_config.bnb_4bit_quant_type is {kind!r}, not one of "
                             f"{', '.join(BNB_4BIT_TYPES)}")
    else:
        key = "bits" if "bits" in quant else "w_bit"
        bits = quant.get(key)
        if method in QUANT_LOADERS and (isinstance(bits, bool) or bits not in QUANT_BITS):
            raise InputError(f"{where}: quantization_config.{key} is {bits!r}, not one of "
                             f"{', '.join(map(str, QUANT_BITS))}")
        kind = str(quant.get("version") or quant.get("quant_type") or method)
    label = f"{method} {bits}-bit" + (f" {kind}" if kind and kind != method else "")
    return {"method": method, "bits": bits, "kind": kind, "label": label}


def load_yaml(text: str) -> Any:
    """yaml.safe_load, through libyaml where PyYAML has it (several times faster: `lqmf models list` reads 3 files).

    PyYAML is imported here, not at the top: `adapters list` and `status` import this module without
    reading any YAML, and importing PyYAML costs about a tenth of their start (docs/cli.md)."""
    import yaml

    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise InputError(f"{path}:{where}: invalid YAML") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping with 'models' and 'families'")
    unknown = set(data) - {"models", "families"}
    if unknown:
        key = sorted(unknown)[0]
        raise InputError(f"{path}: unknown key '{key}'{did_you_mean(key, ['models', 'families'])}")
    for section in ("models", "families"):
        if not isinstance(data.get(section) or {}, dict):
            raise InputError(f"{path}: '{section}' must be a mapping")
    for alias, entry in (data.get("models") or {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
            raise InputError(f"{path}: model '{alias}' needs a 'source' (hub id, folder or package:...)")
        bad = set(entry) - {"source", "family", "description"}
        if bad:
            key = sorted(bad)[0]
            raise InputError(
                f"{path}: model '{alias}': unknown key '{key}'"
                f"{did_you_mean(key, ['source', 'family', 'description'])}"
            )
    return data


class ModelCatalogue:
    """Aliases and family defaults for one workspace."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        builtin = _read_yaml(BUILTIN_CATALOGUE)
        local = _read_yaml(workspace.models_file) if workspace.models_file.is_file() else {}
        self.families: dict[str, dict[str, Any]] = {**builtin["families"], **(local.get("families") or {})}
        self.models: dict[str, dict[str, Any]] = {}
        self.origin: dict[str, str] = {}
        for origin, data in (("builtin", builtin), ("workspace", local)):
            for alias, entry in (data.get("models") or {}).items():
                self.models[str(alias)] = entry
                self.origin[str(alias)] = origin

    def resolve(self, reference: str) -> ResolvedModel:
        if reference in self.models:
            entry = self.models[reference]
            resolved = self._resolve_source(entry["source"], reference, base_dir=self.workspace.root)
            family = entry.get("family") or resolved.family
            _ = resolved.quantization  # refuses a quantization_config no loader could take, before any work
            return self._with_family(resolved, family, alias=reference)
        local = Path(reference).expanduser()
        if local.is_dir() or (self.workspace.root / local).is_dir():
            resolved = self._resolve_source(reference, reference, base_dir=self.workspace.root)
            if resolved.kind == "local" and not resolved.available:
                raise InputError(f"{resolved.path}: not a model folder (it has no config.json); give a folder "
                                 "saved by save_pretrained, a hub id or an alias from `lqmf models list`")
            _ = resolved.quantization  # refuses a quantization_config no loader could take, before any work
            return resolved
        if reference.startswith("package:") or _looks_like_hub_id(reference):
            return self._resolve_source(reference, reference, base_dir=self.workspace.root)
        raise NotFoundError(
            f"unknown model '{reference}'{did_you_mean(reference, self.models)}: "
            "give an alias from `lqmf models list`, a local folder or a hub id like org/name"
        )

    def _resolve_source(self, source: str, reference: str, base_dir: Path) -> ResolvedModel:
        if source.startswith("package:"):
            module, _, subdir = source[len("package:"):].partition("/")
            spec = importlib.util.find_spec(module) if module else None
            path = None
            if spec is not None and spec.submodule_search_locations:
                path = Path(list(spec.submodule_search_locations)[0]) / subdir
            resolved = ResolvedModel(reference, source, "package", path, None)
        elif _looks_like_hub_id(source) and not (base_dir / source).is_dir() and not Path(source).is_dir():
            resolved = ResolvedModel(reference, source, "hub", _hub_cache_snapshot(source), None)
        else:
            path = Path(source).expanduser()
            if not path.is_absolute():
                path = path if path.is_dir() else base_dir / path
            resolved = ResolvedModel(reference, source, "local", path.resolve(), None)
        config = read_model_config(resolved.path) if resolved.available else {}
        family = config.get("model_type")
        return self._with_family(resolved, family, alias=None, config=config)

    def _with_family(self, resolved: ResolvedModel, family: str | None, alias: str | None,
                     config: dict[str, Any] | None = None) -> ResolvedModel:
        defaults = self.families.get(family or "", {})
        return ResolvedModel(
            reference=resolved.reference,
            source=resolved.source,
            kind=resolved.kind,
            path=resolved.path,
            family=family,
            target_modules=defaults.get("target_modules"),
            chat_template=defaults.get("chat_template"),
            alias=alias or resolved.alias,
            config=config if config is not None else resolved.config,
        )

    def add(self, alias: str, source: str, family: str | None = None, description: str | None = None,
            force: bool = False) -> None:
        """Add an alias to the workspace's configs/models.yaml (atomically)."""
        import yaml

        validate_name(alias, "model alias")
        path = self.workspace.models_file
        data = _read_yaml(path) if path.is_file() else {}
        models = data.setdefault("models", {}) or {}
        data["models"] = models
        if alias in models and not force:
            raise ConflictError(f"model alias '{alias}' already exists in {path}; use --force to replace it")
        if family is not None and family not in self.families:
            raise InputError(f"unknown family '{family}'{did_you_mean(family, self.families)}")
        local = Path(source).expanduser()
        if local.is_dir():
            source = str(local.resolve())
            quantization_of(read_model_config(local), str(local / "config.json"))  # refuse what train would
        elif not (source.startswith("package:") or _looks_like_hub_id(source)):
            raise InputError(f"model source '{source}' is neither a folder nor a hub id like org/name")
        entry: dict[str, Any] = {"source": source}
        if family:
            entry["family"] = family
        if description:
            entry["description"] = description
        models[alias] = entry
        header = "# Workspace models: added to (and overriding) LQMF's built-in catalogue.\n"
        atomic_write_text(path, header + yaml.safe_dump(data, sort_keys=False))


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


HUB_PROBE_S = 1.5
_hub_reason: list[str | None] = []  # the probe's answer, once per process


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached now (offline mode, or no connection within HUB_PROBE_S
    seconds), or None when it answers: a model missing from the cache then fails at once, not after a
    minute of the hub client's retries."""
    import socket
    import threading
    from urllib.parse import urlsplit

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if _hub_reason:
        return _hub_reason[0]
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlsplit(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    answer: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_S).close()
            answer.append(None)
        except OSError as err:
            answer.append(f"{host}:{port} cannot be reached ({err.strerror or type(err).__name__})")

    thread = threading.Thread(target=probe, daemon=True)  # name lookups have no timeout of their own
    thread.start()
    thread.join(HUB_PROBE_S)
    _hub_reason.append(answer[0] if answer else f"{host}:{port} did not answer within {HUB_PROBE_S:g} s")
    return _hub_reason[0]


def require_downloadable(resolved: ResolvedModel) -> None:
    """Fail at once when a hub model is not in the cache and the hub cannot be reached."""
    if resolved.kind != "hub" or resolved.available:
        return
    reason = hub_unreachable()
    if reason:
        raise RuntimeFailure(f"'{resolved.reference}' ({resolved.source}) is not in the Hugging Face cache and "
                             f"cannot be downloaded: {reason}; connect and retry, or give a local folder "
                             f"(offline, `lqmf plan {resolved.reference}` estimates memory from the catalogue's "
                             "shape)")


def _hub_cache_snapshot(repo_id: str) -> Path | None:
    """The newest downloaded snapshot of a hub model, found without importing huggingface_hub."""
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    snapshots = Path(cache) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return None
    candidates = [p for p in snapshots.iterdir() if (p / "config.json").is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def read_model_config(path: Path | None) -> dict[str, Any]:
    if path is None or not (path / "config.json").is_file():
        return {}
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise InputError(f"{path / 'config.json'}: not valid JSON") from None
