"""Command lines for the `flux-schnell generate` tests: the arguments every small run shares, once."""

from __future__ import annotations

SMALL_SIZE = ("--width", "256", "--height", "256")
"""The smallest size the service takes: every test image that need not be another size."""


def generate_args(*args: str) -> list[str]:
    """`generate` with `args` at the small size (`SMALL_SIZE`); a later --width/--height wins."""
    return ["generate", *SMALL_SIZE, *args]
