"""Inference: load any checkpoint (loading.py), a KV-cache attention kernel (kv_cache.py), generation (generate.py)."""

from torchtitan.inference.generate import GenerationStats, generate, sample
from torchtitan.inference.kv_cache import KVCacheAttention, kv_cache
from torchtitan.inference.loading import InferenceModel, find_checkpoint, load_for_inference

__all__ = [
    "GenerationStats",
    "InferenceModel",
    "KVCacheAttention",
    "find_checkpoint",
    "generate",
    "kv_cache",
    "load_for_inference",
    "sample",
]
