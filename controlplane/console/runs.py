"""Console page module (being written)."""

from __future__ import annotations

from controlplane.console.render import Page

PAGES: list[tuple[str, Page]] = []
ACTIONS: list[tuple[str, Page]] = []
