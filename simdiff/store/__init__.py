"""Saving a pruned model: save, verify, lineage, model card (through the output contract)."""
