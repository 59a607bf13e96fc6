"""loraplex gateway: one base model, many LoRA adapters, over gRPC on vLLM."""

__version__ = "0.1.0"
