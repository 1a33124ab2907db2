"""mavjax.atomic_write: the one write-then-rename of every whole file mavjax writes (checkpoint manifests and
markers, a batch job's error list, benchmark results)."""

import json
import os

import pytest

from mavjax.atomic_write import write_json, write_text


def test_write_replaces_whole(tmp_path):
    p = tmp_path / "r.json"
    write_json(p, {"a": 1})
    write_json(p, {"a": [1, 2]}, indent=1)
    assert json.loads(p.read_text()) == {"a": [1, 2]} and sorted(os.listdir(tmp_path)) == ["r.json"]
    write_json(p, {"x": object()}, default=str)  # json's fallback for other objects
    assert json.loads(p.read_text())["x"].startswith("<object")


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    """Killed before the rename (here: the rename fails), the target still holds the old text, whole; a value
    json cannot write fails before any file is touched."""
    p = tmp_path / "r.txt"
    write_text(p, "old\n")

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_text(p, "new text that never lands\n")
    assert p.read_text() == "old\n"
    monkeypatch.undo()
    with pytest.raises(TypeError):
        write_json(p, {"x": object()})
    assert p.read_text() == "old\n"
