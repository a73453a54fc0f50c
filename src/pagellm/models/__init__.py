"""Model families: configuration from GGUF metadata and the decoder."""
from pagellm.models.config import SUPPORTED_ARCHITECTURES, ModelArgs
from pagellm.models.llama import LlamaModel

__all__ = ["ModelArgs", "LlamaModel", "SUPPORTED_ARCHITECTURES"]
