"""Orchestration of prune, score and compare (library entry points)."""
