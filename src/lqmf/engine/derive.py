"""New adapters from registered ones: combine (PEFT's add_weighted_adapter), compress (SVD rank
reduction and half-precision storage), and the held-out score that the quality gate reads.

Each writes a complete PEFT folder into a staging path; the CLI registers it with
Registry.finalize (staging + rename), so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lqmf.core.derived import Gate, check_combinable, derived_manifest
from lqmf.core.errors import ConflictError, InputError, LqmfError
from lqmf.core.registry import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST, AdapterEntry, Registry, mark_staging
from lqmf.core.weights import read_safetensors_header
from lqmf.core.workspace import Workspace
from lqmf.engine import data as data_mod
from lqmf.engine import inference
from lqmf.engine.loading import first_line, first_nonfinite

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "config.yaml"
NEW_SLOT = "default"  # PEFT saves the adapter called "default" flat in the folder, any other in a subfolder


def load_base_for(workspace: Workspace, entry: AdapterEntry, device: str = "auto") -> inference.InferenceModel:
    """The base model of entry, loaded as `lqmf test` loads it for that adapter (4-bit if trained so)."""
    quantized = bool((entry.manifest.get("runtime") or {}).get("quantized_4bit"))
    return inference.load_for_inference(workspace, None, base=inference.adapter_base(workspace, entry),
                                        task=entry.manifest["task"], labels=inference.labels_of(entry) or None,
                                        device=device, quantize_4bit=quantized)


def held_out(entry: AdapterEntry, eval_file: Path | None, limit: int = 0) -> tuple[list[dict], dict | None, list]:
    """(examples, source, notes): the adapter's re-created validation split, or eval_file (as `lqmf bench`)."""
    from lqmf.engine.evaluation import quality_set

    notes: list[str] = []
    found = quality_set(entry, eval_file, limit, notes)
    return (found.examples, found.source, notes) if found else ([], None, notes)


def score(model: inference.InferenceModel, slot: str, examples: list[dict[str, Any]],
          config: dict[str, Any]) -> dict[str, float]:
    """Held-out loss (and accuracy / macro-F1 for classification) of one resident adapter, as training scores."""
    from lqmf.engine.train.loop import evaluate

    classification = model.task == "classification"
    label_ids = {label: i for i, label in enumerate(model.labels)} if classification else None
    overlong = config.get("overlong", "truncate")
    encoded = data_mod.encode_examples(model.tokenizer, examples, model.task, int(config.get("max_seq_length", 512)),
                                       "truncate" if overlong == "error" else overlong, label_ids, source="evaluation")
    if not encoded.rows:
        return {}
    batch = max(1, int(config.get("per_device_train_batch_size", 2)) * 2)
    with inference.adapter_context(model, slot):
        return evaluate(model.loaded, encoded.rows, classification, batch, len(model.labels))


def _copy_extras(source: Path, staging: Path) -> None:
    """The source folder's other files (its training log), not its PEFT files, manifest or config."""
    for path in source.iterdir():
        if path.is_file() and path.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST, CONFIG_FILE):
            shutil.copy2(path, staging / path.name)


def _write_config(staging: Path, manifest: dict[str, Any]) -> None:
    """config.yaml beside the weights, as training writes it: the manifest's config (r and alpha updated)."""
    from lqmf.core.config import dump_config, resolve_config

    values = {k: v for k, v in (manifest.get("config") or {}).items() if v is not None}
    (staging / CONFIG_FILE).write_text(dump_config(resolve_config({}, values)), encoding="utf-8")


# ----------------------------------------------------------------------------- combine


def combine(model: inference.InferenceModel, sources: list[AdapterEntry], staging: Path, method: str,
            weights: list[float], density: float | None, seed: int = 42) -> dict[str, Any]:
    """Load every source beside model's base, add PEFT's weighted combination as a new adapter and save it
    into staging. The combination stays resident as slot NEW_SLOT. Returns its r and alpha."""
    import torch

    slots = [f"source{i}" for i in range(len(sources))]
    for entry, slot in zip(sources, slots, strict=True):
        inference.attach_adapter(model, entry.path, slot)
    torch.manual_seed(seed)  # dare_* drop entries at random
    extra = {"density": density} if density is not None else {}
    try:
        model.model.add_weighted_adapter(slots, weights, NEW_SLOT, combination_type=method, **extra)
    except (ValueError, TypeError, RuntimeError) as err:
        raise InputError(f"PEFT cannot combine these adapters with --method {method}: "
                         f"{first_line(err)}") from None
    model.model.eval()  # the new slot's dropout modules start in training mode
    model.adapters.append(NEW_SLOT)
    staging.mkdir(parents=True, exist_ok=True)
    model.model.save_pretrained(str(staging), selected_adapters=[NEW_SLOT])
    _check_finite_file(staging / ADAPTER_WEIGHTS, f"the {method} combination of {', '.join(e.name for e in sources)}")
    config = model.model.peft_config[NEW_SLOT]
    return {"r": config.r, "alpha": config.lora_alpha,
            "target_modules": sorted(config.target_modules) if isinstance(config.target_modules, set)
            else config.target_modules}


# ----------------------------------------------------------------------------- compress


def _pairs(state: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """{module name: (lora_A key, lora_B key)} of a PEFT LoRA state dict."""
    pairs = {}
    for key in state:
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            pairs[module.removeprefix(PEFT_PREFIX)] = (key, f"{module}.lora_B.weight")
    return pairs


def _module_scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """The LoRA scaling PEFT applies to module (alpha / r, alpha / sqrt(r) with rsLoRA, patterns honoured)."""
    from peft.utils.other import get_pattern_key

    patterns = config.get("alpha_pattern") or {}
    alpha = patterns.get(get_pattern_key(list(patterns), module), config["lora_alpha"])
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _kept_rank(singular, rank: int | None, energy: float | None) -> int:
    """How many singular values to keep: at most rank, or the fewest holding `energy` of the squared sum."""
    if energy is None:
        return max(1, min(rank or len(singular), len(singular)))
    squared = singular.double() ** 2
    share = squared.cumsum(0) / squared.sum().clamp_min(1e-30)
    return max(1, min(int((share < energy - 1e-9).sum()) + 1, len(singular)))


def reduce_pair(lora_a, lora_b, scaling: float, rank: int | None, energy: float | None):
    """(A', B') of rank R with B' @ A' the best rank-R approximation of scaling * B @ A.

    QR of both factors reduces the SVD to an r x r matrix; the singular values are split evenly
    (square roots) between the factors and the scaling is folded into them (the new scaling is 1).
    """
    import torch

    a, b = lora_a.double(), lora_b.double()
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    kept = _kept_rank(s, rank, energy)
    root = (s[:kept] * scaling).sqrt()
    new_b = (q_b @ u[:, :kept]) * root
    new_a = root[:, None] * (vh[:kept] @ q_a.T)
    return new_a.float(), new_b.float()


def _check_reduces(source: Path, rank: int | None, progress: Callable[[str], None]) -> None:
    """Refuse --rank above every module's rank (read from the weights' header): nothing could be reduced.
    At the adapter's rank, say that nothing is reduced (the SVD refactors the weights exactly)."""
    if rank is None:
        return
    tensors = read_safetensors_header(source / ADAPTER_WEIGHTS)
    ranks = [tensors[key_a][1][0] for key_a, _ in _pairs(tensors).values() if tensors.get(key_a, ("", ()))[1]]
    if ranks and rank > max(ranks):
        raise InputError(f"--rank {rank}: adapter {source.name} has rank {max(ranks)}, so nothing would change; "
                         f"give a rank below {max(ranks)} (or only --dtype to change its storage)")
    if ranks and rank == max(ranks):
        progress(f"note: --rank {rank} is the rank of {source.name}: nothing is reduced (the SVD refactors its "
                 "weights exactly); give a lower rank to shrink it")


def compress(source: Path, staging: Path, rank: int | None, energy: float | None, dtype: str | None) -> dict[str, Any]:
    """Write source's adapter into staging with each LoRA pair reduced (rank or energy) and stored in dtype.

    Modules may end with different ranks (--energy): PEFT's rank_pattern and alpha_pattern record them.
    Returns the new adapter's r (the largest), alpha and per-module ranks.
    """
    import torch
    from safetensors.torch import save_file

    config = json.loads((source / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise InputError(f"{source / ADAPTER_CONFIG}: compress works on plain LoRA adapters (not DoRA or "
                         f"{config.get('peft_type')})")
    state = _check_finite_file(source / ADAPTER_WEIGHTS, f"adapter {source.name}")
    target_dtype = getattr(torch, dtype) if dtype else None
    out: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    for module, (key_a, key_b) in _pairs(state).items():
        lora_a, lora_b = state.pop(key_a), state.pop(key_b)
        if rank is None and energy is None:  # dtype only
            out[key_a], out[key_b] = lora_a, lora_b
            ranks[module] = lora_a.shape[0]
            continue
        scaling = _module_scaling(config, module, lora_a.shape[0])
        out[key_a], out[key_b] = reduce_pair(lora_a, lora_b, scaling, rank, energy)
        ranks[module] = out[key_a].shape[0]
    if target_dtype is not None:
        out = {k: v.to(target_dtype) for k, v in out.items()}
    out.update(state)  # modules_to_save (a classifier head, used as stored: its dtype must stay) and the rest
    staging.mkdir(parents=True, exist_ok=True)
    bad = first_nonfinite(out)
    if bad is not None:
        raise InputError(f"compressing {source.name} gives NaN or infinite values in '{bad}' (stored as {dtype}?); "
                         "refused")
    save_file({k: v.contiguous() for k, v in out.items()}, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    top = max(ranks.values())
    if rank is not None or energy is not None:  # the scaling is folded into the weights: alpha = r everywhere
        pattern = {module: r for module, r in ranks.items() if r != top}
        config.update(r=top, lora_alpha=top, use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern))
    (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    _copy_extras(source, staging)
    return {"r": config["r"], "alpha": config["lora_alpha"], "module_ranks": ranks}


# ----------------------------------------------------------------------------- services


def _staged(registry: Registry, name: str, operation: str, build: Callable[[Path], Path]) -> Path:
    """Run build(staging) under NAME's run lock; a failure (or a gate refusal) leaves no staging folder,
    and a kill leaves one that says which operation left it (registry.mark_staging)."""
    with registry.training_run(name, wait=5.0):
        staging = registry.staging_path(name)
        shutil.rmtree(staging, ignore_errors=True)
        try:
            mark_staging(staging, operation)
            return build(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _gated(gate: Gate, scores: dict[str, float] | None) -> None:
    broken = [f"{key} {value}" for key, value in (scores or {}).items() if not math.isfinite(value)]
    if broken:
        raise LqmfError(f"not registered: the held-out {', '.join(broken)} (the result's weights are broken)")
    refusal = gate.refusal(scores)
    if refusal:
        raise LqmfError(f"not registered: {refusal}")


def _check_finite_file(path: Path, what: str) -> dict[str, Any]:
    """The tensors of the safetensors file at path; InputError naming what and the tensor if one holds
    NaN or an infinity."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    bad = first_nonfinite(state)
    if bad is not None:
        raise InputError(f"{what}: '{bad}' in {path} holds NaN or infinite values; refused")
    return state


def _quality(entry: AdapterEntry, eval_file: Path | None, gate: Gate, progress: Callable[[str], None]):
    """The held-out examples and their source; the gate fails here, before any model loads, without them."""
    gate.check_task(entry.manifest["task"])
    examples, source, notes = held_out(entry, eval_file)
    for note in notes:
        progress(f"note: {note}")
    if gate.active and not examples:
        _gated(gate, None)
    return examples, source


def combine_adapters(workspace: Workspace, new: str, names: list[str], method: str, weights: list[float],
                     density: float | None = None, eval_file: Path | None = None, gate: Gate | None = None,
                     device: str = "auto", force: bool = False,
                     progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Combine registered adapters into a new registered adapter NEW; returns what was done."""
    registry, gate = Registry(workspace), gate or Gate()
    if registry.exists(new) and not force:
        raise ConflictError(f"adapter '{new}' already exists; use --force to replace it")
    entries = [registry.get(name) for name in names]
    check_combinable(entries, method, density)
    examples, source = _quality(entries[0], eval_file, gate, progress)

    def build(staging: Path) -> Path:
        progress(f"loading the base model of '{entries[0].name}'")
        model = load_base_for(workspace, entries[0], device)
        progress(f"combining {', '.join(names)} ({method})")
        lora = combine(model, entries, staging, method, weights, density,
                       int((entries[0].manifest.get("config") or {}).get("seed", 42)))
        scores = score(model, NEW_SLOT, examples, entries[0].manifest.get("config") or {}) if examples else None
        _gated(gate, scores)
        lineage = {"operation": "combine", "method": method, "weights": weights, "density": density}
        manifest = derived_manifest(new, entries, lora, lineage, {"data": source, "scores": scores} if scores else None)
        _write_config(staging, manifest)
        return registry.finalize(new, staging, manifest, force=force)

    target = _staged(registry, new, "combine", build)
    manifest = registry.get(new).manifest
    return {"adapter": new, "path": str(target), "lineage": manifest["lineage"], "lora": manifest["lora"],
            "quality": manifest.get("quality"), "size_bytes": (target / ADAPTER_WEIGHTS).stat().st_size}


def compress_adapter(workspace: Workspace, name: str, new: str | None, rank: int | None, energy: float | None,
                     dtype: str | None, eval_file: Path | None = None, gate: Gate | None = None,
                     device: str = "auto", force: bool = False,
                     progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Compress NAME into NEW (or into NAME itself when new is None); returns sizes and scores before/after."""
    registry, gate = Registry(workspace), gate or Gate()
    entry = registry.get(name)
    target_name = new or name
    if new and registry.exists(new) and not force:
        raise ConflictError(f"adapter '{new}' already exists; use --force to replace it")
    _check_reduces(entry.path, rank, progress)
    examples, source = _quality(entry, eval_file, gate, progress)
    size_before = (entry.path / ADAPTER_WEIGHTS).stat().st_size
    scores: list[dict[str, float] | None] = [None, None]

    def build(staging: Path) -> Path:
        lora = compress(entry.path, staging, rank, energy, dtype)
        if examples:
            progress(f"loading the base model of '{name}' to score before and after")
            model = load_base_for(workspace, entry, device)
            config = entry.manifest.get("config") or {}
            for index, path in enumerate((entry.path, staging)):
                inference.attach_adapter(model, path, f"v{index}")
                scores[index] = score(model, f"v{index}", examples, config)
        _gated(gate, scores[1])
        lineage = {"operation": "compress", "rank": rank, "energy": energy, "dtype": dtype,
                   "module_ranks": lora.pop("module_ranks"),
                   "size_bytes": {"before": size_before, "after": (staging / ADAPTER_WEIGHTS).stat().st_size}}
        quality = {"data": source, "scores": scores[1], "before": scores[0]} if scores[1] else None
        manifest = derived_manifest(target_name, [entry], lora, lineage, quality)
        _write_config(staging, manifest)
        return registry.finalize(target_name, staging, manifest, force=force or new is None)

    target = _staged(registry, target_name, "compress", build)
    return {"adapter": target_name, "source": name, "path": str(target), "in_place": new is None,
            "size_bytes": {"before": size_before, "after": (target / ADAPTER_WEIGHTS).stat().st_size},
            "rank": {"before": (entry.manifest.get("lora") or {}).get("r"), "after": registry.get(target_name)
                     .manifest["lora"]["r"]},
            "dtype": dtype, "scores": {"before": scores[0], "after": scores[1]}, "quality_data": source}
