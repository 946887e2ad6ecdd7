"""Evaluation tools: the shipped digits classifier (accuracy and feature-space Fréchet distance for the digits demo),
the Fréchet distance itself, FID through torchmetrics when Inception weights are available locally, and ``dtx eval``.
"""
