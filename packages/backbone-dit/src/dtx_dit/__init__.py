"""DiT (Peebles & Xie, 2023) for dtx."""

__version__ = "0.1.0"
