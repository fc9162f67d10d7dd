"""Small fakes of the few ComfyUI modules the package touches: `comfy.utils`,
`comfy.model_management`, `folder_paths` and `server` (what comfy_bridge.py calls, nothing more)."""

from __future__ import annotations

import types
from pathlib import Path

import torch


class InterruptProcessingException(Exception):
    """Stand-in for comfy.model_management.InterruptProcessingException."""


class ComfyStandIn:
    """`comfy.utils`, `comfy.model_management`, `folder_paths` and `server` as small fakes.

    Like ComfyUI's, `ProgressBar.update*` raises the interrupt exception once an interrupt was
    requested; `interrupt()` is what the Cancel button does. `texts` collects (node id, text) of
    every `PromptServer.instance.send_progress_text` call, from any thread.
    """

    def __init__(self, tmp_path: Path):
        self.interrupted = False
        self.bars: list = []
        self.updates: list[tuple[int, int, object]] = []
        self.bar_updates: list[tuple[str | None, int]] = []  # (node id, value) of every update
        self.texts: list[tuple[str, str]] = []
        self.user_dir = tmp_path / "comfy_user"
        self.models_dir = tmp_path / "comfy_models"
        stand_in = self

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total, self.current, self.node_id = total, 0, node_id
                stand_in.bars.append(self)

            def update_absolute(self, value, total=None, preview=None):
                stand_in.throw_if_interrupted()
                self.current = value
                stand_in.updates.append((value, total or self.total, preview))
                stand_in.bar_updates.append((self.node_id, value))

            def update(self, value):
                self.update_absolute(self.current + value, self.total)

        self.utils = types.ModuleType("comfy.utils")
        self.utils.ProgressBar = ProgressBar
        self.mm = types.ModuleType("comfy.model_management")
        self.mm.InterruptProcessingException = InterruptProcessingException
        self.mm.processing_interrupted = lambda: stand_in.interrupted
        self.mm.throw_exception_if_processing_interrupted = stand_in.throw_if_interrupted
        self.mm.get_torch_device = lambda: torch.device("cpu")
        self.mm.freed: list[tuple[int, object]] = []
        self.mm.free_memory = lambda num_bytes, device: self.mm.freed.append((num_bytes, device))
        self.mm.soft_empty_cache = lambda: None
        self.comfy = types.ModuleType("comfy")
        self.comfy.utils, self.comfy.model_management = self.utils, self.mm
        self.folder_paths = types.ModuleType("folder_paths")
        self.folder_paths.get_user_directory = lambda: str(stand_in.user_dir)
        self.folder_paths.get_filename_list = self._filenames
        self.folder_paths.get_folder_paths = lambda name: [str(stand_in.models_dir / name)]
        self.folder_paths.get_full_path = self._full_path

        class PromptServer:
            instance = None

            def send_progress_text(self, text, node_id, sid=None):
                stand_in.texts.append((str(node_id), text))

        PromptServer.instance = PromptServer()
        self.server = types.ModuleType("server")
        self.server.PromptServer = PromptServer

    def throw_if_interrupted(self):
        if self.interrupted:
            self.interrupted = False  # ComfyUI clears the flag when it raises
            raise InterruptProcessingException()

    def interrupt(self):
        self.interrupted = True

    def next_prompt(self):
        """What ComfyUI's executor does as a prompt starts: clear a Cancel left from the last one."""
        self.interrupted = False

    def _filenames(self, name):
        folder = self.models_dir / name
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def _full_path(self, name, filename):
        path = self.models_dir / name / filename
        return str(path) if path.is_file() else None

    def modules(self) -> dict[str, types.ModuleType]:
        return {
            "comfy": self.comfy,
            "comfy.utils": self.utils,
            "comfy.model_management": self.mm,
            "folder_paths": self.folder_paths,
            "server": self.server,
        }
