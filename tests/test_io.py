"""Atomic writes: content, file modes (those of a plain ``open()`` under the umask) and no temp file left behind."""

import os
import stat
import sys

import pytest

from dinokit import io

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(saved)


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def plain_open_mode(tmp_path, name: str) -> int:
    with open(tmp_path / name, "w"):
        pass
    return mode(tmp_path / name)


def test_modes_are_those_of_plain_open(tmp_path, umask):
    umask(0o022)
    io.atomic_write_text(tmp_path / "a.json", "{}")
    io.atomic_write_bytes(tmp_path / "sub" / "b.bin", b"\x00\x01")
    with io.atomic_path(tmp_path / "c.safetensors") as tmp:
        tmp.write_bytes(b"xyz")
    for name in ("a.json", "sub/b.bin", "c.safetensors"):
        assert mode(tmp_path / name) == 0o644, name
    assert mode(tmp_path / "a.json") == plain_open_mode(tmp_path, "plain")
    assert (tmp_path / "a.json").read_text() == "{}" and (tmp_path / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.safetensors").read_bytes() == b"xyz"
    umask(0o077)
    io.atomic_write_text(tmp_path / "private.json", "{}")
    assert mode(tmp_path / "private.json") == 0o600 == plain_open_mode(tmp_path, "plain2")


def test_rewrite_keeps_the_existing_mode(tmp_path, umask):
    umask(0o022)
    p = tmp_path / "r.txt"
    p.write_text("old")
    os.chmod(p, 0o640)
    io.atomic_write_text(p, "new")
    assert p.read_text() == "new" and mode(p) == 0o640
    os.chmod(p, 0o444)  # read-only: still replaced (the new content is written before the mode is copied)
    with io.atomic_path(p) as tmp:
        tmp.write_text("newer")
    assert p.read_text() == "newer" and mode(p) == 0o444


def test_failed_write_leaves_no_temp_file(tmp_path, umask):
    umask(0o022)
    (tmp_path / "keep.txt").write_text("old")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with io.atomic_path(tmp_path / "keep.txt") as tmp:
            tmp.write_text("half")
            raise Boom
    with pytest.raises(TypeError):
        io.atomic_write_bytes(tmp_path / "keep.txt", "not bytes")  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert (tmp_path / "keep.txt").read_text() == "old"


def test_temp_dir_has_mkdir_mode(tmp_path, umask):
    umask(0o022)
    d = io.make_temp_dir(tmp_path, prefix=".x.")
    assert d.is_dir() and d.parent == tmp_path and d.name.startswith(".x.") and d.name.endswith(".tmp")
    assert mode(d) == 0o755
    (tmp_path / "plain").mkdir()
    assert mode(d) == mode(tmp_path / "plain")


def test_atomic_dir_layout_gets_mkdir_mode(tmp_path, umask):
    from dinokit.data import layouts

    umask(0o022)
    with layouts.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f.txt").write_text("x")
    assert mode(tmp_path / "out") == 0o755 and mode(tmp_path / "out" / "f.txt") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_fsync_dir_ignores_what_cannot_be_synced(tmp_path):
    io.fsync_dir(tmp_path)  # a real folder: synced
    io.fsync_dir(tmp_path / "missing")  # cannot be opened: ignored, no exception
    assert tmp_path.is_dir()
