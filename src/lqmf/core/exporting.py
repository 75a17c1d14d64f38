"""Exporting an adapter: where it goes, what goes in it, and writing it without half-states.

PATH names the export itself (a folder, or a .tar.gz with --archive); a PATH that ends with '/'
is a folder to export into, as NAME (NAME-merged for --merge; plus .tar.gz for --archive).
Everything is built in a temporary folder beside the target and renamed into place when done.
Temporaries are named after their process (owner_tag), so the next export to the same PATH can
remove those a killed export left, and never one a running export is still writing.

Every export folder holds lqmf-export.json, the record of what the export wrote (an export id and
its files). --force replaces only a folder with that record and no file beyond it: never an adapter
of some registry, a user's folder, or an export someone has added files to.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lqmf import __version__
from lqmf.core.errors import ConflictError, InputError
from lqmf.core.export_formats import FORMATS, GGUF_OUTTYPES
from lqmf.core.faults import fault_point
from lqmf.core.fsutil import fsync_dir, owner_alive, owner_tag
from lqmf.core.registry import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    AdapterEntry,
    Registry,
    contained_file,
    file_inventory,
    file_sha256,
)

CHECKSUMS = "SHA256SUMS"
EXPORT_RECORD = "lqmf-export.json"
README = "README.md"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
PEFT_EXPORT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "config.yaml")
# .STEM.PIDpSTART[.RANDOM].lqmf-tmp (being built) or .lqmf-old (a --force'd export moved aside)
TEMPORARY = re.compile(r"^\.(?P<stem>.+)\.(?P<pid>\d+)p(?P<started>\d+)(?:\.[^.]+)?\.lqmf-(?P<kind>tmp|old)$")


@dataclass(frozen=True)
class ExportPlan:
    entry: AdapterEntry
    target: Path  # the folder, or the .tar.gz file
    folder_name: str  # the export folder's name (inside the archive too)
    merge: bool
    archive: bool
    force: bool
    runtime: str = "peft"  # peft | gguf | ollama | vllm (--format)
    outtype: str = "f16"  # the GGUF tensor type

    @property
    def format(self) -> str:
        """What the folder holds: peft, merged, gguf, ollama, ollama-merged, vllm or vllm-merged."""
        if self.runtime == "peft":
            return "merged" if self.merge else "peft"
        return f"{self.runtime}-merged" if self.merge else self.runtime


def export_folder_name(name: str, runtime: str, merge: bool) -> str:
    """NAME, NAME-merged, NAME-gguf, NAME-ollama(-merged), NAME-vllm(-merged)."""
    parts = [name] + ([runtime] if runtime != "peft" else []) + (["merged"] if merge else [])
    return "-".join(parts)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def plan_export(registry: Registry, name: str, path: str, *, merge: bool = False, archive: bool = False,
                force: bool = False, runtime: str = "peft", outtype: str | None = None) -> ExportPlan:
    """Resolve and check the export path before anything is written (raises InputError / ConflictError)."""
    if runtime not in FORMATS:
        raise InputError(f"unknown export format '{runtime}'; choose one of {', '.join(FORMATS)}")
    if outtype is not None and runtime not in ("gguf", "ollama"):
        raise InputError(f"--outtype sets the GGUF tensor type; --format {runtime} writes no GGUF")
    outtype = outtype or "f16"
    if outtype not in GGUF_OUTTYPES:
        raise InputError(f"unknown GGUF --outtype '{outtype}'; choose one of {', '.join(GGUF_OUTTYPES)}")
    if runtime != "peft" and archive:
        raise InputError(f"--archive packs PEFT or merged exports; a --format {runtime} export is a folder to "
                         "use where it is written")
    if runtime == "gguf" and merge:
        raise InputError("--format gguf writes an adapter for the base model's GGUF; for a merged GGUF, export "
                         "--merge and convert that folder with llama.cpp's convert_hf_to_gguf.py")
    entry = registry.get_intact(name)
    if not path or not path.strip():
        raise InputError("the export path is empty")
    folder_name = export_folder_name(name, runtime, merge)
    into_folder = path.endswith(("/", os.sep))
    given = Path(path).expanduser()
    given = (given if given.is_absolute() else Path.cwd() / given).resolve()
    if into_folder:
        target = given / (folder_name + (ARCHIVE_SUFFIXES[0] if archive else ""))
    else:
        target = given
        if archive and not target.name.endswith(ARCHIVE_SUFFIXES):
            raise InputError(f"archive path '{target}' must end in .tar.gz (or end PATH with / to export into it)")
    workspace = registry.workspace.root.resolve()
    if _inside(target, registry.root.resolve()):
        raise InputError(f"export path '{target}' is inside the adapter registry {registry.root}; "
                         "export somewhere else")
    if _inside(workspace, target):
        raise InputError(f"export path '{target}' would contain the workspace {workspace}; pick a new folder")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"cannot export to '{target}': '{ancestor}' is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"cannot export to '{target}': '{ancestor}' is not writable")
    if target.exists() or target.is_symlink():
        _check_replaceable(target, archive, force, into_folder)
    return ExportPlan(entry, target, folder_name, merge, archive, force, runtime, outtype)


def _check_replaceable(target: Path, archive: bool, force: bool, into_folder: bool) -> None:
    if not force:
        hint = "" if into_folder or not target.is_dir() or archive else \
            ", or end PATH with / to export into that folder"
        raise ConflictError(f"'{target}' already exists; use --force to replace it{hint}")
    if target.is_symlink():
        raise ConflictError(f"'{target}' is a symbolic link; refusing to replace it")
    if archive and target.is_dir():
        raise ConflictError(f"'{target}' is a folder; refusing to replace it with an archive")
    if not archive:
        if not target.is_dir():
            raise ConflictError(f"'{target}' is a file; refusing to replace it with a folder")
        _check_written_by_export(target)


def read_export_record(folder: Path) -> dict[str, Any] | None:
    """The record an export left in folder, None when it has none (or not a readable one)."""
    try:
        record = json.loads((folder / EXPORT_RECORD).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("export_id"), str):
        return None
    files = record.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return record


def _check_written_by_export(target: Path) -> None:
    """Refuse to replace a folder unless an export wrote it and nothing was added to it since."""
    record = read_export_record(target)
    if record is None:
        if not any(target.iterdir()):
            return
        if (target / MANIFEST).is_file():
            raise ConflictError(f"'{target}' has {MANIFEST} but no valid {EXPORT_RECORD}: it is an adapter folder (of "
                                "a registry, maybe another workspace's) or an export lqmf did not record; "
                                "refusing to replace it even with --force")
        raise ConflictError(f"'{target}' is not an LQMF export (it has no {EXPORT_RECORD}); "
                            "refusing to replace it even with --force")
    present = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file() or p.is_symlink()}
    added = sorted(present - set(record["files"]) - {EXPORT_RECORD})
    if added:
        shown = ", ".join(added[:3]) + (f" and {len(added) - 3} more" if len(added) > 3 else "")
        raise ConflictError(f"'{target}' holds files its export did not write ({shown}); "
                            "refusing to replace it even with --force")


# ----------------------------------------------------------------------------- building the content


def copy_adapter_files(entry: AdapterEntry, folder: Path) -> None:
    """Copy the PEFT files (and the resolved config) checking each against the manifest's checksums."""
    recorded = (entry.manifest or {}).get("files") or {}
    for rel in PEFT_EXPORT_FILES:
        source = contained_file(entry.path, rel)
        if source is None or not source.is_file():
            if rel in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                raise InputError(f"adapter '{entry.name}' has no {rel}")
            continue
        if source.is_symlink():
            raise InputError(f"{source} is a symbolic link; refusing to export it")
        shutil.copyfile(source, folder / rel)
        expected = (recorded.get(rel) or {}).get("sha256") if isinstance(recorded, dict) else None
        if expected and file_sha256(folder / rel) != expected:
            raise InputError(f"{source} does not match the checksum in its manifest; "
                             f"run `lqmf adapters verify {entry.name}`")


def export_manifest(entry: AdapterEntry, folder: Path, fmt: str, details: dict[str, Any]) -> dict[str, Any]:
    """The adapter's manifest, with the exported files' inventory and how the export was made."""
    return {
        **(entry.manifest or {}),
        "files": file_inventory(folder),
        "export": {"format": fmt, "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "from": str(entry.path), "lqmf_version": __version__, **details},
    }


def write_checksums(folder: Path) -> None:
    """SHA256SUMS in `sha256sum -c` format, covering every other file of the export."""
    sums = {rel: info["sha256"] for rel, info in file_inventory(folder).items() if rel != CHECKSUMS}
    sums[MANIFEST] = file_sha256(folder / MANIFEST)
    (folder / CHECKSUMS).write_text("".join(f"{sums[rel]}  {rel}\n" for rel in sorted(sums)), encoding="utf-8")


def finish_folder(entry: AdapterEntry, folder: Path, fmt: str, details: dict[str, Any]) -> list[str]:
    """Write README, manifest, checksums and last the export record into the (temporary) folder that holds
    the exported weights; returns every file of the export."""
    (folder / README).write_text(readme_text(entry, fmt, details), encoding="utf-8")
    manifest = export_manifest(entry, folder, fmt, details)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    write_checksums(folder)
    files = sorted([*file_inventory(folder), MANIFEST])
    record = {"export_id": uuid.uuid4().hex, "adapter": entry.name, "format": fmt,
              "written": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": files}
    (folder / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return sorted([*files, EXPORT_RECORD])


def base_reference(entry: AdapterEntry) -> str:
    """The base model as other tools name it: its hub id, or the folder it was loaded from."""
    base = entry.base_model
    return str((base.get("source") if base.get("kind") == "hub" else base.get("path") or base.get("source"))
               or base.get("reference") or "")


def readme_text(entry: AdapterEntry, fmt: str, details: dict[str, Any]) -> str:
    manifest = entry.manifest or {}
    base = entry.base_model
    base_ref = base_reference(entry)
    task = manifest.get("task")
    lora = manifest.get("lora") or {}
    classification = task == "classification"
    auto = "AutoModelForSequenceClassification" if classification else "AutoModelForCausalLM"
    lines = [f"# {entry.name}", "",
             f"A LoRA adapter made by LQMF {__version__}: task `{task}`, "
             f"base model `{base.get('reference')}`, rank {lora.get('r')}, "
             f"target modules {lora.get('target_modules')}.",
             ""]
    if details.get("command"):
        lines += [f"Use it with {details['runtime']}:", "", "```sh", details["command"], "```", ""]
        lines += [f"- {note}" for note in details.get("notes", [])] + ([""] if details.get("notes") else [])
    if fmt.endswith("merged"):
        lines += ["This folder is the base model with the adapter merged into its weights: it loads without peft.",
                  "", "```python", f"from transformers import {auto}, AutoTokenizer", "",
                  f'model = {auto}.from_pretrained(".")', 'tokenizer = AutoTokenizer.from_pretrained(".")', "```"]
        if details.get("trained_quantized_4bit"):
            lines += ["", details["note"]]
    elif fmt in ("gguf", "ollama"):
        lines += [f"`{details.get('gguf_file')}` is the adapter alone ({details.get('outtype')}): load it on a GGUF "
                  "of the same base model, converted from the same weights."]
    else:
        labels = manifest.get("id2label") or {}
        extra = (f", num_labels={len(labels)}, id2label={ {int(k): v for k, v in labels.items()} }"
                 if classification else "")
        lines += ["Load it with PEFT on its base model:", "", "```python",
                  "from peft import PeftModel", f"from transformers import {auto}", "",
                  f'base = {auto}.from_pretrained("{base_ref}"{extra})',
                  'model = PeftModel.from_pretrained(base, ".")', "```"]
        if manifest.get("runtime", {}).get("quantized_4bit"):
            lines += ["", "It was trained on the 4-bit (NF4) quantized base (QLoRA); it also loads on the "
                          "unquantized base, with slightly different outputs."]
    metrics = manifest.get("metrics") or {}
    shown = {k: v for k, v in metrics.items() if k.startswith("eval_") or k in ("train_loss", "steps")}
    if shown:
        lines += ["", "## Metrics", "", *(f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}"
                                          for k, v in shown.items())]
    lines += ["", f"`{MANIFEST}` is LQMF's manifest (dataset, resolved config, metrics, versions); "
                  f"`{CHECKSUMS}` checks the files: `sha256sum -c {CHECKSUMS}`.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- writing it in place


@contextmanager
def build_folder(plan: ExportPlan) -> Iterator[Path]:
    """A temporary folder beside the target, removed unless the export is installed."""
    plan.target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{plan.folder_name}.{owner_tag()}.", suffix=".lqmf-tmp",
                                 dir=plan.target.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _shareable_modes(folder: Path) -> None:
    """Files as the umask allows (some writers, safetensors among them, create theirs 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def make_archive(folder: Path, plan: ExportPlan) -> Path:
    """Pack folder as FOLDER_NAME/ into a temporary .tar.gz beside the target; returns its path."""
    import tarfile

    tmp = plan.target.with_name(f".{plan.target.name}.{owner_tag()}.{time.time_ns()}.lqmf-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, unlike mkstemp's 0600
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w:gz") as tar:
                for path in sorted(folder.rglob("*")):
                    rel = path.relative_to(folder).as_posix()
                    info = tar.gettarinfo(str(path), arcname=f"{plan.folder_name}/{rel}")
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    if path.is_file():
                        with open(path, "rb") as handle:
                            tar.addfile(info, handle)
                    else:
                        tar.addfile(info)
            raw.flush()
            os.fsync(raw.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def install(built: Path, plan: ExportPlan) -> None:
    """Move the finished export into place, replacing the old one only now (with --force)."""
    target = plan.target
    old = None
    if target.exists():
        if not plan.force:  # it appeared while we were building
            raise ConflictError(f"'{target}' already exists; use --force to replace it")
        if target.is_dir():
            _check_written_by_export(target)  # again: it may have changed while we were building
            old = target.with_name(f".{target.name}.{owner_tag()}.lqmf-old")
            target.rename(old)
            fault_point("export.old_moved_aside")
    os.replace(built, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(plan: ExportPlan, kind: str) -> list[str]:
    """Remove what killed exports to this target left beside it: kind 'tmp' (unfinished builds) or 'old'
    (a previous export moved aside by --force; only once the target is in place). Returns their names.

    Only temporaries whose process is gone are removed; a name that does not say its process is kept.
    """
    if kind == "old" and not plan.target.exists():
        return []
    removed = []
    for path in sorted(plan.target.parent.glob(f".*.lqmf-{kind}")):
        match = TEMPORARY.match(path.name)
        if (match is None or match["stem"] not in (plan.folder_name, plan.target.name)
                or owner_alive(int(match["pid"]), int(match["started"]))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def write_export(plan: ExportPlan, build_into: Callable[[Path], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write the export. build_into(folder) -> details, when given, writes the content (a merged model, a
    GGUF adapter ...) instead of the PEFT files; details may name the command that uses the export.

    A path that cannot be written (read-only file system, no permission, no space) fails with one line.
    """
    try:
        return _write_export(plan, build_into)
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        raise InputError(f"cannot write the export to '{plan.target}': {err.strerror or err}{where}") from None


def _write_export(plan: ExportPlan, build_into: Callable[[Path], dict[str, Any]] | None) -> dict[str, Any]:
    stale = remove_stale_temporaries(plan, "tmp") if plan.target.parent.is_dir() else []
    with build_folder(plan) as work:
        folder = work / plan.folder_name
        folder.mkdir()
        if build_into is not None:
            details = build_into(folder)
        elif plan.merge or plan.runtime in ("gguf", "ollama"):
            raise ValueError(f"a {plan.format} export needs build_into")
        else:
            copy_adapter_files(plan.entry, folder)
            details = {}
        files = finish_folder(plan.entry, folder, plan.format, details)
        _shareable_modes(folder)
        fault_point("export.written")
        if plan.archive:
            built = make_archive(folder, plan)
            try:
                install(built, plan)
            except BaseException:
                built.unlink(missing_ok=True)
                raise
        else:
            install(folder, plan)
    stale += remove_stale_temporaries(plan, "old")
    result = {"adapter": plan.entry.name, "path": str(plan.target), "format": plan.format,
              "archive": plan.archive, "files": files, "stale_removed": stale, **details}
    if plan.archive:
        result["sha256"] = file_sha256(plan.target)
    return result
