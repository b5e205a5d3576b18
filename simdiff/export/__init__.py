"""Checkpoint formats other than transformers' safetensors folders (GGUF for llama.cpp and ollama)."""
