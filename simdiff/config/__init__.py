"""The recipe schema and field metadata: plain dataclasses, no torch at import."""
