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
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from . import REPO

PACKAGE_NAME = "comfyui_flux_schnell"


def _put_checkout_first_on_path() -> None:
    for name in [m for m in sys.modules if m == PACKAGE_NAME or m.startswith(PACKAGE_NAME + ".")]:
        del sys.modules[name]  # an installed copy imported before this plugin
    link_dir = Path(tempfile.mkdtemp(prefix="flux-schnell-tests-"))
    atexit.register(shutil.rmtree, link_dir, ignore_errors=True)
    try:
        (link_dir / PACKAGE_NAME).symlink_to(REPO, target_is_directory=True)
    except OSError:  # no symlinks (Windows without developer mode): this process only
        spec = importlib.util.spec_from_file_location(
            PACKAGE_NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE_NAME] = module
        spec.loader.exec_module(module)
        return
    sys.path.insert(0, str(link_dir))
    existing = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(link_dir), existing]))


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args) -> None:
    """Before any conftest or test module imports the package."""
    _put_checkout_first_on_path()


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if path.resolve() == REPO:
        return pytest.Dir.from_parent(parent, path=path)
    return None
