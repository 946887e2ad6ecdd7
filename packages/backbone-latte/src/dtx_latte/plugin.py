"""Plugin module of the Latte shell package: registers nothing until the Latte issue is done."""

from __future__ import annotations

SHELL = True
