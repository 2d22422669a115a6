"""The output guard: inputs are never written over, --overwrite replaces only grape outputs,
one run per output at a time, leftovers of killed runs are removed, modes follow the umask."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest

import grape.output_guard as guard
from grape.errors import GrapeWarning, OutputBusyError, OutputError, OutputExistsError
from grape.output_guard import check_disjoint, claim_output


def _model(root: Path) -> Path:
    model = root / "parent" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    return model


def _finish(claim, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (claim.tmp / name).write_text(text)
    listed = sorted([*files, "grape_report.json"])
    (claim.tmp / "grape_report.json").write_text(json.dumps({"grape_version": "test", "files": listed}))
    return claim.commit()


@pytest.mark.parametrize(
    ("out", "why"),
    [
        ("parent/model", "is the input model"),
        ("parent", "contains the input model"),
        (".", "contains the input model"),
        ("parent/model/pruned", "lies inside the input model"),
        ("link-to-model", "is the input model"),  # a symlink is resolved first
        ("link-to-parent", "contains the input model"),
    ],
)
def test_out_may_not_overlap_an_input(tmp_path, out, why):
    model = _model(tmp_path)
    (tmp_path / "link-to-model").symlink_to(model)
    (tmp_path / "link-to-parent").symlink_to(model.parent)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=why):
            claim_output(tmp_path / out, inputs={"input model": model}, overwrite=overwrite)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_every_named_input_is_checked_and_none_is_skipped(tmp_path):
    model, calib = _model(tmp_path), tmp_path / "data" / "calib.txt"
    calib.parent.mkdir()
    calib.write_text("text")
    with pytest.raises(OutputError, match="contains the calibration data"):
        check_disjoint(tmp_path / "data", {"input model": model, "calibration data": calib, "teacher": None})
    with pytest.raises(OutputError, match="lies inside the statistics cache"):
        check_disjoint(tmp_path / "cache" / "x", {"statistics cache": tmp_path / "cache"})
    assert check_disjoint(tmp_path / "out", {"input model": model, "teacher": None}) == tmp_path / "out"


def test_overwrite_replaces_only_empty_dirs_and_grape_outputs(tmp_path):
    model = _model(tmp_path)
    inputs = {"input model": model}
    out = tmp_path / "out"

    out.write_text("a file")
    with pytest.raises(OutputExistsError, match="not a directory"):
        claim_output(out, inputs=inputs, overwrite=True)
    out.unlink()

    out.mkdir()
    (out / "notes.txt").write_text("years of work")
    with pytest.raises(OutputExistsError, match="--overwrite to replace it"):
        claim_output(out, inputs=inputs, overwrite=False)
    with pytest.raises(OutputExistsError, match=r"holds no grape_report.json, so it is not a grape output"):
        claim_output(out, inputs=inputs, overwrite=True)
    (out / "notes.txt").unlink()

    with claim_output(out, inputs=inputs, overwrite=True) as claim:  # empty: may be replaced
        _finish(claim, {"model.safetensors": "weights"})
    with claim_output(out, inputs=inputs, overwrite=True) as claim:  # a grape output: may be replaced
        _finish(claim, {"model.safetensors": "new weights"})
    assert (out / "model.safetensors").read_text() == "new weights"

    (out / "my-notes.txt").write_text("added by the user")
    with pytest.raises(OutputExistsError, match=r"holds files grape did not write \(my-notes.txt\)"):
        claim_output(out, inputs=inputs, overwrite=True)
    (out / "my-notes.txt").unlink()
    (out / "grape_report.json").write_text("{not json")
    with pytest.raises(OutputExistsError, match="unreadable"):
        claim_output(out, inputs=inputs, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "parent"]


def test_an_older_grape_output_without_a_file_list_is_replaced_unless_it_holds_folders(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "grape_report.json").write_text(json.dumps({"grape_version": "0.0"}))
    (out / "model.safetensors").write_text("weights")
    with claim_output(out, inputs={}, overwrite=True) as claim:
        _finish(claim, {"a": "b"})
    assert sorted(p.name for p in out.iterdir()) == ["a", "grape_report.json"]
    (out / "grape_report.json").write_text(json.dumps({"grape_version": "0.0"}))
    (out / "data").mkdir()
    with pytest.raises(OutputExistsError, match=r"did not write \(data/\)"):
        claim_output(out, inputs={}, overwrite=True)


def test_a_second_claim_on_the_same_output_is_refused_until_the_first_ends(tmp_path):
    out = tmp_path / "out"
    first = claim_output(out, inputs={}, overwrite=False)
    with pytest.raises(OutputBusyError, match=rf"another grape run \(pid {os.getpid()}, started .*\) is writing"):
        claim_output(out, inputs={}, overwrite=False)
    _finish(first, {"x": "1"})
    with pytest.raises(OutputExistsError, match="--overwrite"):
        claim_output(out, inputs={}, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # lock and temp dir are gone


def test_commit_checks_again_what_appeared_meanwhile(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="exists"), claim_output(out, inputs={}, overwrite=False) as claim:
        out.mkdir()  # someone else (not grape) created it during the run
        (out / "theirs.txt").write_text("theirs")
        _finish(claim, {"x": "1"})
    assert (out / "theirs.txt").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_aborted_claim_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), claim_output(out, inputs={}, overwrite=False) as claim:
        (claim.tmp / "half.safetensors").write_text("half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


_KILLED_CLAIM = textwrap.dedent(
    """
    import os, signal, sys
    from grape.output_guard import claim_output
    claim = claim_output(sys.argv[1], inputs={}, overwrite=False)
    (claim.tmp / "half.safetensors").write_text("half written")
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_leftovers_of_a_killed_run_are_removed_by_the_next_claim(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", _KILLED_CLAIM, str(out)], env=env, capture_output=True)
    assert done.returncode == -9
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left[0] == ".out.grape-lock" and left[1].startswith(".out.grape-tmp-") and len(left) == 2
    (tmp_path / ".out.grape-old-12345").mkdir()  # an interrupted replacement, too
    with pytest.warns(GrapeWarning, match="removed what an interrupted run left"):
        claim = claim_output(out, inputs={}, overwrite=False)
    _finish(claim, {"x": "1"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_modes_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        with claim_output(tmp_path / "out", inputs={}, overwrite=False) as claim:
            fd = os.open(claim.tmp / "private", os.O_CREAT | os.O_WRONLY, 0o600)  # as mkstemp does
            os.close(fd)
            out = _finish(claim, {})
    finally:
        os.umask(previous)
    assert (out / "private").stat().st_mode & 0o777 == 0o640
    assert out.stat().st_mode & 0o777 == 0o750


def test_not_enough_free_space_and_unwritable_locations_are_refused_before_work(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(guard.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(OutputError, match=r"not enough free space .* needs about 1.00 MiB, .* has 1000 B free"):
        claim_output(tmp_path / "out", inputs={}, overwrite=False, needed_bytes=1 << 20)
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path / ".out.grape-lock"))

    monkeypatch.setattr(guard.os, "open", read_only)
    with pytest.raises(OutputError, match=r"cannot write the output .*: the file system is read-only"):
        claim_output(tmp_path / "out", inputs={}, overwrite=False)
    with pytest.raises(OutputError, match="parent directory .* does not exist"):
        claim_output(tmp_path / "missing" / "out", inputs={}, overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_a_replaced_output_is_removed_only_after_the_new_one_is_in_place(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with claim_output(out, inputs={}, overwrite=False) as claim:
        _finish(claim, {"old": "old"})
    seen = []
    real_rmtree = shutil.rmtree

    def watching_rmtree(path, *args, **kwargs):
        if ".grape-old-" in str(path):
            seen.append(sorted(p.name for p in out.iterdir()))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(guard.shutil, "rmtree", watching_rmtree)
    with claim_output(out, inputs={}, overwrite=True) as claim:
        _finish(claim, {"new": "new"})
    assert seen == [["grape_report.json", "new"]]
