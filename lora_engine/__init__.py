"""lora-engine: many LoRA adapters trained concurrently on one frozen base model.

Layers, bottom to top (each imports only the ones below it; see docs/ARCHITECTURE.md):
``lora_engine.kernels`` -> ``ops`` -> ``engine`` -> ``rl`` -> ``studies``, ``interop`` -> ``cli``.
"""
from lora_engine import ops
from lora_engine.engine.bank import AdapterBank
from lora_engine.engine.model import MultiLoRAModel
from lora_engine.engine.spec import AdapterSpec
from lora_engine.interop.client import Client, Engine
from lora_engine.rl.config import TrainConfig
from lora_engine.rl.trainer import GRPOTrainer

__version__ = "0.1.0"
__all__ = ["ops", "AdapterSpec", "AdapterBank", "MultiLoRAModel", "Client", "Engine", "TrainConfig",
           "GRPOTrainer", "__version__"]
