import os

import pytest

from noprop.atomic import write_atomically, write_text_atomically


def test_text_roundtrip_creates_parents(tmp_path):
    path = write_text_atomically(tmp_path / "a" / "b.json", "[1, 2]\nü\n")
    assert path.read_text(encoding="utf-8") == "[1, 2]\nü\n"


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text_atomically(tmp_path / "r.csv", "old\n")

    def dies(f):
        f.write(b"half a fi")
        raise KeyboardInterrupt  # Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, dies)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]


def test_new_file_gets_the_mode_open_would_give(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_text_atomically(tmp_path / "new.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640  # 0o666 less the umask, not mkstemp's 0o600


def test_replacing_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "kept.txt"
    path.write_text("v1")
    path.chmod(0o604)
    write_text_atomically(path, "v2")
    assert path.read_text() == "v2" and path.stat().st_mode & 0o777 == 0o604


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    """kill -9 mid-save runs no cleanup: the temp file stays until the next write to the same target."""
    import subprocess
    import sys

    target = tmp_path / "c.pt"
    code = ("import os, sys, time; from noprop.atomic import write_atomically\n"
            "def hang(f):\n    f.write(b'half'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
            f"write_atomically({str(target)!r}, hang)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    left = list(tmp_path.glob(".c.pt.*.tmp"))
    assert len(left) == 1 and f".{proc.pid}." in left[0].name
    other_live = tmp_path / f".c.pt.{os.getpid()}.abc.tmp"  # this process: alive, so not touched
    other_live.write_bytes(b"x")
    write_text_atomically(target, "done")
    assert target.read_text() == "done"
    assert not left[0].exists() and other_live.exists()
