"""Choosing layers: criterion specs, ranking, one-shot/iterative evidence, held-out search."""
