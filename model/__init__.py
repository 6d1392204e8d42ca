"""The Llama family (SmolLM, SmolLM2, Llama 3.x): config, network, loading, tokenizer, generation."""

from .config import PRESETS, ModelConfig
from .generate import generate, generate_batched, next_token_logprobs
from .llama import KVCache, Llama, Packing, count_parameters
from .load import build_model, load_model, load_tokenizer, read_safetensors, resolve_source
from .tokenizer import Tokenizer

__all__ = ["PRESETS", "ModelConfig", "Llama", "KVCache", "Packing", "Tokenizer", "load_model", "load_tokenizer", "build_model",
           "read_safetensors", "resolve_source", "generate", "generate_batched", "next_token_logprobs", "count_parameters"]
