"""Write-then-rename for the files mavjax writes whole (checkpoint manifests and markers, a batch job's error
list, benchmark results): the text goes to `<name>.tmp`, is flushed to disk, then renamed over the target, so a
reader - or a resumed job - sees the old file or the whole new one, never a torn one, whenever the writer is
killed."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text(path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path, obj, indent: int = 2, default=None) -> None:
    """obj as JSON (`default`: json.dumps' fallback for other objects, e.g. str) by `write_text`."""
    write_text(path, json.dumps(obj, indent=indent, default=default))
