"""Validation gradients, occurrence scores, per-sample values and time windows."""
