"""Drafting at volume: a run of prompts to a folder, and what the command line and the Drafts node
do with it.

- `run.py`: a run (`RunSettings`, plan, resume, each image paid once); `prompts.py`: prompts files
  (text and JSONL); `manifest.py`: `manifest.jsonl`; `lock.py`: one folder, one run;
- `gallery.py`: `index.html` with picks; `report.py`: what a folder's runs cost;
  `png_files.py`: PNGs with text chunks, thumbnails; `progress.py`: the terminal's progress;
- `command.py`: the command line's command bodies (`cli.py` keeps the parser);
  `node_run.py`: the "FLUX Schnell Drafts" node's run.

The entry points below are imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .command import (
        EXIT_USAGE,
        config_command,
        exit_codes_help,
        gallery_command,
        generate_command,
        report_command,
        set_key_command,
    )
    from .node_run import drafts_folder, run_drafts
    from .progress import ProgressLogHandler
    from .run import RunSettings

__all__ = [
    "EXIT_USAGE",
    "ProgressLogHandler",
    "RunSettings",
    "config_command",
    "drafts_folder",
    "exit_codes_help",
    "gallery_command",
    "generate_command",
    "report_command",
    "run_drafts",
    "set_key_command",
]
_HOME = {  # entry point -> the module that defines it
    "EXIT_USAGE": "command",
    "config_command": "command",
    "exit_codes_help": "command",
    "gallery_command": "command",
    "generate_command": "command",
    "report_command": "command",
    "set_key_command": "command",
    "drafts_folder": "node_run",
    "run_drafts": "node_run",
    "ProgressLogHandler": "progress",
    "RunSettings": "run",
}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
