"""k2conv: Kimi K2-family checkpoints to llama.cpp GGUF, streaming and exact."""

__version__ = "0.1.0"
