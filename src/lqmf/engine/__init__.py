"""The only layer that imports torch, transformers, peft, bitsandbytes and datasets (lazily: importing
a module here imports none of them).

Packages: lora/ (our LoRA layers), decode/ (decoders), serve/ (lqmf serve), train/ (lqmf train, tune, learn).
Beside them: loading.py (models and tokenizers, the one place that picks device, dtype and
quantization), compat.py (every touch of a library's private or undocumented API), data.py (examples
to token ids), inference.py (load an adapter and answer: lqmf test, bench, shell, serve),
model_cache.py (the model `lqmf shell` keeps), evaluation.py (lqmf bench), derive.py (adapters combined or compressed),
export.py (merging into the base), gguf_adapter.py (llama.cpp's adapter GGUF), tiny.py (tiny local
models for tests and demos).
docs/architecture.md has the map.
"""

import sys


class _QuietBitsandbytes:
    """bitsandbytes logs advisory warnings at import (e.g. an optional CPU kernel package missing), and
    every engine path imports it lazily (so do PEFT and transformers): this import finder, which finds
    nothing, quiets its logger just before its first import. Importing `logging` here instead would cost
    every light command that imports engine/compat.py (each verb group: about 1.7 ms of its start)."""

    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None) -> None:
        if name == "bitsandbytes":
            _quiet()
        return None


def _quiet() -> None:
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


if "bitsandbytes" in sys.modules:  # imported before lqmf.engine: quiet what it logs from now on
    _quiet()
sys.meta_path.insert(0, _QuietBitsandbytes)
