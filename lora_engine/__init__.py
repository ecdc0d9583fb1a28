"""lora-engine: many LoRA adapters trained concurrently on one frozen base model."""
from lora_engine import ops
from lora_engine.engine.bank import AdapterBank, AdapterSpec
from lora_engine.engine.model import MultiLoRAModel
from lora_engine.interop.client import Engine

__version__ = "0.1.0"
__all__ = ["ops", "AdapterSpec", "AdapterBank", "MultiLoRAModel", "Engine", "__version__"]
