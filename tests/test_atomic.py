"""write_atomic: whole file or the old one, never a torn one; the partial keeps the suffix."""

import pytest

from rasa_lora.atomic import write_atomic


def test_text_and_writer(tmp_path):
    write_atomic(tmp_path / "a.json", "{}")
    seen = []
    write_atomic(tmp_path / "b.png", lambda path: (seen.append(path.name), path.write_bytes(b"x")))
    assert (tmp_path / "a.json").read_text() == "{}" and (tmp_path / "b.png").read_bytes() == b"x"
    assert seen == [".b.partial.png"] and sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.png"]


def test_a_failing_writer_leaves_the_old_file(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")

    def fail(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(target, fail)
    assert target.read_text() == "old"
