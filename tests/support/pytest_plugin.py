"""Loaded by pytest before collection (`-p support.pytest_plugin` in pyproject.toml).

The repository root is the package (ComfyUI imports `custom_nodes/<folder>/__init__.py`), so pytest
would collect the root as a Python package named after the folder and import its `__init__.py`
under that name. Clones are often called `comfyui-flux-schnell`, which is no Python identifier, so
that import fails. Two things make the suite independent of the folder's name:

- the root is collected as a plain directory (its `__init__.py` is not a test module);
- `comfyui_flux_schnell` is this checkout, whatever is installed: a symlink of that name to the
  root is put first on `sys.path` and on `PYTHONPATH` (for tests that start subprocesses).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from . import REPO

PACKAGE_NAME = "comfyui_flux_schnell"


def _put_checkout_first_on_path() -> None:
    link_dir = Path(tempfile.mkdtemp(prefix="flux-schnell-tests-"))
    atexit.register(shutil.rmtree, link_dir, ignore_errors=True)
    (link_dir / PACKAGE_NAME).symlink_to(REPO, target_is_directory=True)
    sys.path.insert(0, str(link_dir))
    existing = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(link_dir), existing]))
    for name in [m for m in sys.modules if m == PACKAGE_NAME or m.startswith(PACKAGE_NAME + ".")]:
        del sys.modules[name]  # an installed copy imported before this plugin


_put_checkout_first_on_path()


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if path.resolve() == REPO:
        return pytest.Dir.from_parent(parent, path=path)
    return None
