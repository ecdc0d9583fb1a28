"""lora-engine: many LoRA adapters trained concurrently on one frozen base model."""
from lora_engine import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
