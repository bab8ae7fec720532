"""exo-stable: distributed LLM inference on MLX that answers token for token like one device."""

__version__ = "0.1.0"
