"""Evaluation: quality, speed, memory and cost of candidates, always next to the baseline.

A sub-package on purpose: a top-level `evaluate` would shadow Hugging Face's `evaluate`.
"""
