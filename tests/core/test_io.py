import pytest

from lmslim.core.io import atomic_dir, atomic_write_json, sha256_files


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert target.read_text().strip().endswith("}")
    assert '"a": 2' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_dir_failure_keeps_previous_content(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "new.txt").write_text("partial")
            raise RuntimeError("interrupted")
    assert (final / "keep.txt").read_text() == "old"
    assert not (final / "new.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_dir_success_replaces(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("x")
    assert (final / "a").read_text() == "x"


def test_hash_depends_on_content(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(b"1")
    h1 = sha256_files([a])
    a.write_bytes(b"2")
    assert sha256_files([a]) != h1
