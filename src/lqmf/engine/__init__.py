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

import logging

# bitsandbytes logs advisory warnings at import (e.g. an optional CPU kernel package missing);
# every engine path imports it lazily, so quiet it before any of them can.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
