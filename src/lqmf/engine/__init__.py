"""The only layer that imports torch, transformers, peft, bitsandbytes and datasets."""

import logging

# bitsandbytes logs advisory warnings at import (e.g. an optional CPU kernel package missing);
# every engine path imports it lazily, so quiet it before any of them can.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
