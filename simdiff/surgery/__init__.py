"""Removing layers: in memory, on disk (apply) and in GGUF files."""
