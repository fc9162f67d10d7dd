"""Write the template-browser thumbnail `<name>.jpg` beside each workflow in example_workflows/.

Each is a real output of its workflow, run in-process against the loopback fake ImageAPI (the local
one with tiny random-weight models): see tests/support/thumbnails.py. Run from the repository root:

    python -m scripts.make_thumbnails

tests/test_workflows.py fails when a thumbnail no longer matches its workflow's output.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tests.support import thumbnails
from tests.support import workflow_tools as wt


def main() -> int:
    with (
        tempfile.TemporaryDirectory(prefix="thumbnails-") as tmp,
        thumbnails.in_process_comfy(Path(tmp)) as env,
    ):
        for ui_path in wt.ui_workflow_paths():
            picture = thumbnails.render(ui_path, env.package.NODE_CLASS_MAPPINGS, env.out_dir)
            target = thumbnails.save_jpeg(picture, wt.thumbnail_path(ui_path))
            size = target.stat().st_size
            print(f"{target.relative_to(wt.REPO)}: {picture.width}x{picture.height}, {size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
