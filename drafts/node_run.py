"""The "FLUX Schnell Drafts" node's run: the command line's drafts engine (drafts/run.py) inside ComfyUI.

`run_drafts` checks every prompt before anything is paid or written, locks the folder
(drafts/lock.py), runs a `DraftRun` into it (each image written as it arrives, `manifest.jsonl`,
thumbnails), writes `index.html`, and returns the saved files' names (for ComfyUI's previews, at most
`MAX_PREVIEWS`) and a contact sheet of at most `SHEET_COLUMNS * SHEET_ROWS` thumbnails captioned with
their line numbers: bounded whatever the number of prompts. Cancel (ComfyUI's interrupt) stops sending,
keeps what arrives for the calls in flight, records it, then raises ComfyUI's interrupt; queueing the
node again requests only what is missing (the folder's manifest and files, as a re-run of the command
line), and collects the async jobs an earlier run paid for but did not collect (drafts/run.py).
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..errors import FluxSchnellError, GenerationInterrupted, InvalidInputError
from .gallery import thumbnail_path, write_gallery
from .lock import FolderLock
from .prompts import PromptLine, check_prompts_file, read_prompt_lines
from .run import (
    DraftRun,
    JobCollector,
    RunSettings,
    StopRun,
    api_backend,
    line_request,
    local_backend,
    plan,
)

MAX_PREVIEWS = 64
SHEET_COLUMNS, SHEET_ROWS, SHEET_CELL, CAPTION_H = 8, 8, 128, 16


@dataclass
class DraftsResult:
    folder: Path
    previews: list[str]  # file names in the folder, at most MAX_PREVIEWS, in line order
    sheet: Image.Image
    done: int
    failed: int
    skipped: int
    duplicates: int
    interrupted: bool
    collected: int = 0  # of `done`: jobs an earlier run paid for, collected (no new request)


class NodeProgress:
    """What DraftRun reports, onto the node's comfy_bridge.Progress ("k of N images done")."""

    def __init__(self, progress):
        self.progress = progress

    def advance(self, *, failed: bool = False, duplicate: bool = False, skipped: bool = False) -> None:
        self.progress.done += 1
        self.progress.show()
        bar = self.progress._bar
        if bar is not None and not self.progress.should_stop():  # ComfyUI's bar raises on Cancel
            bar.update_absolute(self.progress.done, self.progress.total)

    def note(self, text: str) -> None:
        self.progress.set_status(text.splitlines()[0][:200])

    def waiting_on(self, label: str, why: str | None) -> None:
        pass


def drafts_folder(output_dir: str | None, name: str) -> tuple[Path, str]:
    """The folder `name` under ComfyUI's output folder, and its subfolder name for previews."""
    clean = name.strip().replace("\\", "/").strip("/")
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or os.path.isabs(name.strip()):
        raise InvalidInputError(
            f"folder {name!r}: give a folder name under ComfyUI's output folder, like 'drafts/foxes' "
            "(no '..', not an absolute path)."
        )
    if output_dir is None:
        raise InvalidInputError("folder: ComfyUI's output folder is not known (not running in ComfyUI).")
    return Path(output_dir, *parts), "/".join(parts)


def run_drafts(
    run_settings: RunSettings,
    prompts_text: str,
    prompts_file: Path | None,
    progress,
    api_settings=None,
    spec=None,
) -> DraftsResult:
    """Run the drafts of `prompts_file` (or of `prompts_text`, the rules of a prompts file)."""
    scratch = None
    if prompts_file is None:
        scratch = tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False)  # noqa: SIM115
        with scratch:
            scratch.write(prompts_text)
        prompts_file = Path(scratch.name)
    try:
        return _run(run_settings, prompts_file, progress, api_settings, spec)
    finally:
        if scratch is not None:
            os.unlink(scratch.name)


def _run(run_settings, prompts_file, progress, api_settings, spec) -> DraftsResult:
    backend_name = run_settings.backend

    def check(entry: PromptLine) -> None:
        line_request(entry, run_settings)[0].validate(backend_name)

    try:
        found = check_prompts_file(prompts_file, check)
    except InvalidInputError as e:
        raise InvalidInputError(str(e).replace(f"--prompts-file {prompts_file}", "prompts")) from None
    total = found.count * run_settings.request.batch_size
    progress.total = total
    folder = run_settings.out_dir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thumbs").mkdir(exist_ok=True)
    stop = threading.Event()
    watcher = _CancelWatcher(progress, stop)
    with FolderLock(folder, flag="folder"):
        if backend_name == "api":
            from ..api import StopRequest

            # Cancel drains: nothing new is sent, the answers in flight (maybe paid) are written.
            drain = StopRequest(drain_when=stop.is_set)
            backend = api_backend(api_settings, run_settings, stop, stop_request=drain)
            collector = JobCollector(api_settings, stop, drain)  # jobs earlier runs paid for
        else:
            backend = local_backend(spec, run_settings, stop)
            collector = None
        run = DraftRun(run_settings, backend, NodeProgress(progress), _ends_run, collector)
        watcher.start()
        try:
            run.run(read_prompt_lines(prompts_file), total)
        except GenerationInterrupted:
            pass
        except StopRun as e:
            raise FluxSchnellError(f"the drafts stopped: {e}") from None
        finally:
            watcher.close()
        write_gallery(folder)
    previews, sheet = _previews_and_sheet(read_prompt_lines(prompts_file), run_settings)
    outcome = run.outcome
    return DraftsResult(
        folder,
        previews,
        sheet,
        outcome.done,
        outcome.failed_count,
        outcome.skipped,
        outcome.duplicates,
        watcher.cancelled or stop.is_set(),
        outcome.collected,
    )


def _ends_run(error: FluxSchnellError) -> int | None:
    from ..errors import (
        AuthenticationError,
        InsufficientCreditsError,
        LocalBackendUnavailable,
        ModelLoadError,
    )

    return (
        2
        if isinstance(
            error, (AuthenticationError, InsufficientCreditsError, ModelLoadError, LocalBackendUnavailable)
        )
        else None
    )


class _CancelWatcher:
    """Turns ComfyUI's Cancel into the run's stop flag (seen within 0.1 s, without clearing it), so
    the run sends nothing more but keeps the answers already paid for."""

    def __init__(self, progress, stop: threading.Event):
        self.progress, self.stop = progress, stop
        self.cancelled = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="flux-schnell-cancel", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(0.1):
            if self.progress.should_stop():
                self.cancelled = True
                self.stop.set()
                return

    def close(self) -> None:
        self._done.set()
        self._thread.join()


def _previews_and_sheet(lines, run_settings: RunSettings) -> tuple[list[str], Image.Image]:
    """The run's images on disk in line order (each file once), at most MAX_PREVIEWS names and a
    contact sheet of at most SHEET_COLUMNS * SHEET_ROWS thumbnails; the count beyond is captioned."""
    cells = SHEET_COLUMNS * SHEET_ROWS
    seen: set[str] = set()
    previews: list[str] = []
    tiles: list[tuple[int, Path]] = []
    more = 0
    for planned in plan(lines, run_settings):
        if planned.path.name in seen or not planned.path.is_file():
            continue
        seen.add(planned.path.name)
        if len(previews) < MAX_PREVIEWS:
            previews.append(planned.path.name)
        if len(tiles) < cells:
            tiles.append((planned.line, thumbnail_path(run_settings.out_dir, planned.path.name)))
        else:
            more += 1
    return previews, contact_sheet(tiles, more)


def contact_sheet(tiles: list[tuple[int, Path]], more: int = 0) -> Image.Image:
    """A grid of thumbnails captioned 'line N' (and '+K more' when there are more)."""
    columns = max(1, min(SHEET_COLUMNS, len(tiles)))
    rows = max(1, -(-len(tiles) // columns))
    cell_h = SHEET_CELL + CAPTION_H
    sheet = Image.new("RGB", (columns * SHEET_CELL, rows * cell_h), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i, (line, thumb) in enumerate(tiles):
        x, y = (i % columns) * SHEET_CELL, (i // columns) * cell_h
        try:
            with Image.open(thumb) as picture:
                picture.thumbnail((SHEET_CELL, SHEET_CELL))
                sheet.paste(picture.convert("RGB"), (x, y))
        except OSError:
            draw.rectangle((x, y, x + SHEET_CELL - 1, y + SHEET_CELL - 1), outline=(90, 90, 90))
        caption = f"line {line}" + (f"  +{more} more" if more and i == len(tiles) - 1 else "")
        draw.text((x + 3, y + SHEET_CELL + 2), caption, fill=(230, 230, 230))
    return sheet
