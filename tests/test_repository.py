"""Checks on the repository itself: it stands alone, whatever machine it was written on."""

from __future__ import annotations

import re
import subprocess

from support import REPO

# An absolute path into a home, work or root directory: written on one machine, meaningless on the
# next. Built from parts so that this file does not match itself.
MACHINE_PATH = re.compile("|".join(["/" + "home/[A-Za-z]", "/" + "root/", "/" + "work/", "/" + "Users/"]))


def tracked_text_files():
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=False, text=True
    ).stdout.split("\0")
    files = [REPO / name for name in listed if name] or [  # a copy without .git (as in CI)
        p
        for p in REPO.rglob("*")
        if not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(REPO).parts)
    ]
    for path in files:
        if not path.is_file() or path.suffix in {".png", ".jpg", ".webp", ".safetensors", ".gguf"}:
            continue
        try:
            yield path, path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue


def test_no_tracked_file_names_an_absolute_machine_path():
    found = [
        f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
        for path, text in tracked_text_files()
        for m in MACHINE_PATH.finditer(text)
    ]
    assert not found, "absolute machine paths in tracked files:\n" + "\n".join(found)


def test_the_check_sees_the_files_and_would_catch_a_path(tmp_path):
    names = {path.name for path, _ in tracked_text_files()}
    assert {"README.md", "pyproject.toml", "nodes.py"} <= names
    assert MACHINE_PATH.search("see " + "/" + "work/project/notes.md")
    assert MACHINE_PATH.search("/" + "home/alice/ComfyUI")
    assert not MACHINE_PATH.search("~/ComfyUI and models/diffusion_models")


PACKAGE_FOLDERS_OUTSIDE_THE_WHEEL = {"tests", "benchmarks", "scripts", "example_workflows", "docs"}


def package_folders() -> set[str]:
    """Every folder of the package that holds an `__init__.py`, as its dotted name in the wheel."""
    found = {"comfyui_flux_schnell"}
    for init in REPO.rglob("__init__.py"):
        parts = init.parent.relative_to(REPO).parts
        if (
            not parts
            or parts[0] in PACKAGE_FOLDERS_OUTSIDE_THE_WHEEL
            or any(p.startswith(".") for p in parts)
        ):
            continue
        found.add(".".join(("comfyui_flux_schnell", *parts)))
    return found


def test_pyproject_lists_every_package_folder():
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert package_folders() - listed == set(), (
        "folders with an __init__.py missing from pyproject's packages"
    )
    assert listed - package_folders() == set(), "pyproject lists packages that are not folders"
    assert {"comfyui_flux_schnell.api", "comfyui_flux_schnell.local", "comfyui_flux_schnell.drafts"} <= listed


def test_no_public_top_level_name_is_defined_in_two_modules():
    """One name per thing: a public class, function or constant is defined in one module of the
    package (packages' __init__.py re-export, loggers are everyone's `log`)."""
    import ast
    from collections import defaultdict

    defined: dict[str, list[str]] = defaultdict(list)
    for path in _package_modules():
        if path.name == "__init__.py":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [target.id for target in node.targets if isinstance(target, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            else:
                continue
            for name in names:
                if not name.startswith("_") and name != "log":
                    defined[name].append(str(path.relative_to(REPO)))
    twice = {name: where for name, where in defined.items() if len(where) > 1}
    assert not twice, f"defined in two modules (rename one): {twice}"


def _package_modules():
    skipped = {"tests", "benchmarks", "scripts", "example_workflows", "docs"}
    for path in sorted(REPO.rglob("*.py")):
        relative = path.relative_to(REPO)
        if relative.parts[0] in skipped or relative.parts[0].startswith("."):
            continue
        yield path


SUBPACKAGES = ("api", "local", "drafts", "flux")


def _imports_from_other_packages():
    """(module, line, package, the module imported from it or None, names) of every relative import
    in the package that reaches a subpackage from outside it."""
    import ast

    for path in _package_modules():
        relative = path.relative_to(REPO)
        own = relative.parts[0] if len(relative.parts) > 1 else None
        folder = list(relative.parts[:-1])
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            target = folder[: len(folder) - (node.level - 1)] + (
                node.module.split(".") if node.module else []
            )
            if target and target[0] in SUBPACKAGES and target[0] != own:
                inner = ".".join(target[1:]) or None
                yield str(relative), node.lineno, target[0], inner, [a.name for a in node.names]


def test_modules_outside_a_package_import_only_its_entry_points():
    """`from ..api import load_settings`, never `from ..api.settings import ...`: each package's
    `__init__.py` names what the rest of the package may use of it."""
    import importlib

    deep, unnamed = [], []
    for module, line, package, inner, names in _imports_from_other_packages():
        if inner is not None:
            deep.append(f"{module}:{line}: from {package}.{inner}")
            continue
        listed = importlib.import_module(f"comfyui_flux_schnell.{package}").__all__
        unnamed += [f"{module}:{line}: {package}.{name}" for name in names if name not in listed]
    assert not deep, "import the package's entry points instead:\n" + "\n".join(deep)
    assert not unnamed, "not an entry point of its package (add it to __init__.py):\n" + "\n".join(unnamed)


def test_every_entry_point_of_a_package_resolves_to_where_it_is_defined():
    import importlib

    for package in SUBPACKAGES:
        module = importlib.import_module(f"comfyui_flux_schnell.{package}")
        assert sorted(module.__all__) == sorted(module._HOME), package
        for name in module.__all__:
            home = importlib.import_module(f"comfyui_flux_schnell.{package}.{module._HOME[name]}")
            assert getattr(module, name) is getattr(home, name), f"{package}.{name}"
