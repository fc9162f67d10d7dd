"""Test support: fakes, tiny models, converters and workflow tools shared by tests, benchmarks and
scripts.

Tests import it as `support` (pytest puts `tests/` on the path, see pyproject.toml); benchmarks and
scripts run as modules from the repository root (`python -m benchmarks.api_throughput`) and import it
as `tests.support`. Modules in here import each other relatively, so both names work.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The checkout's root: the package itself (ComfyUI loads `<folder>/__init__.py`)."""

DATA_DIR = REPO / "tests" / "data"
KEYS_DIR = DATA_DIR / "keys"
"""Tensor names and shapes of the public FLUX.1-schnell, T5-XXL, CLIP-L and autoencoder files, and
the prefixes ComfyUI's all-in-one checkpoints use: facts about public checkpoints, kept as test data."""

TEST_KEY = "sk_testkey_DO_NOT_LEAK_0123456789abcdef"
"""The API key the tests use; no output may ever contain it."""
