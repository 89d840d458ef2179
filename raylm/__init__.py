"""raylm: pretrain Transformer language models across a Ray cluster with DeepSpeed."""

__version__ = "0.1.0"
