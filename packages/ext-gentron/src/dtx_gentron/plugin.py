"""Plugin module of the GenTron shell package: registers nothing until the GenTron issue is done."""

from __future__ import annotations

SHELL = True
