"""LQMF: the Local Quantized Model Factory."""

__version__ = "0.1.0"
