"""The only layer that imports torch, transformers, peft, bitsandbytes and datasets."""
