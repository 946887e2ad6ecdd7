"""Latte for dtx -- shell package: installable and discoverable, no models yet (see the roadmap)."""

__version__ = "0.1.0"
IMPLEMENTED = False
