"""The ``wsi-pipeline`` command line (placeholder until the stages land)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    return 0
