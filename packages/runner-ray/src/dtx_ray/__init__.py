"""Ray Train runner for dtx."""

__version__ = "0.1.0"
