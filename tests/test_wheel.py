"""The package as pip installs it: the wheel built from this checkout holds every module, and each
imports from a fresh virtual environment that has only the wheel (its dependencies come from the test
environment's site-packages, appended after the fresh one's, so nothing is downloaded)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile

import pytest
from support import REPO

pytestmark = pytest.mark.slow

PACKAGE = "comfyui_flux_schnell"


def _source_modules() -> set[str]:
    """The package's modules as the checkout has them (what the wheel must hold)."""
    skipped = {"tests", "benchmarks", "scripts", "example_workflows", "docs", "build"}
    names = set()
    for path in REPO.rglob("*.py"):
        relative = path.relative_to(REPO)
        if relative.parts[0] in skipped or any(part.startswith(".") for part in relative.parts):
            continue
        if "egg-info" in relative.parts[0] or "__pycache__" in relative.parts:
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.add(".".join([PACKAGE, *parts]))
    return names


def _clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH (the test plugin puts the checkout there)."""
    return {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(
        REPO,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(".*", "__pycache__", "build", "*.egg-info", "*.whl"),
    )
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=out,
        env=_clean_env(),
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (path,) = out.glob(f"{PACKAGE}-*.whl")
    return path


def test_the_wheel_holds_every_module_of_the_checkout(wheel):
    with zipfile.ZipFile(wheel) as archive:
        files = [name for name in archive.namelist() if name.endswith(".py")]
    in_wheel = {name[: -len(".py")].replace("/", ".").removesuffix(".__init__") for name in files}
    missing = _source_modules() - in_wheel
    assert not missing, f"modules missing from the wheel (a package not listed in pyproject.toml?): {missing}"
    assert not [name for name in in_wheel if name.split(".")[1:2] == ["tests"]], "tests are not shipped"


def test_every_module_of_the_wheel_imports_in_a_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with zipfile.ZipFile(wheel) as archive:  # a wheel's install is its files under site-packages
        archive.extractall(site)
    # The test environment's packages (torch, requests, ...) after the fresh venv's own. A path named
    # in a .pth file is not a site directory: its own .pth files (an editable install's finder of
    # this checkout) are not run, so the only copy of the package found is the wheel's.
    with open(f"{site}/zz_test_deps.pth", "w", encoding="utf-8") as pth:
        pth.write(sysconfig.get_paths()["purelib"] + "\n")
    modules = sorted(_source_modules() - {f"{PACKAGE}.__main__"})  # that one runs the command line
    script = (
        "import importlib, sys\n"
        f"site = {site!r}\n"
        f"for name in {modules!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    assert module.__file__.startswith(site), (name, module.__file__)\n"
        "print(len(sys.modules))\n"
    )
    done = subprocess.run(
        [str(python), "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        env=_clean_env(),
    )
    assert done.returncode == 0, done.stderr[-4000:]
