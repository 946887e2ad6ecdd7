"""Plugin module of the HDiT shell package: registers nothing until the HDiT issue is done."""

from __future__ import annotations

SHELL = True
