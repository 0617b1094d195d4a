"""faceveil.pipeline.batch: input expansion, per-item isolation, streamed reports, Ctrl-C."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from faceveil.errors import FaceveilError
from faceveil.io import atomic
from faceveil.io.images import read_image, write_image
from faceveil.pipeline.batch import BatchItem, SkipItem, expand_inputs, run_batch


def _tree(root: Path) -> Path:
    """root/a.jpg, root/b.PNG, root/notes.txt, root/.hidden.jpg, root/sub/c.jpg, root/sub/clip.mp4"""
    for rel in ("a.jpg", "b.PNG", "notes.txt", ".hidden.jpg", "sub/c.jpg", "sub/clip.mp4", ".git/d.jpg"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return root


def _names(items: list[BatchItem]) -> list[str]:
    return [item.path.name for item in items]


def test_expand_folders_files_and_recursion(tmp_path: Path) -> None:
    root = _tree(tmp_path / "in")
    assert _names(expand_inputs([root])) == ["a.jpg", "b.PNG"]
    assert _names(expand_inputs([root], recursive=True)) == ["a.jpg", "b.PNG", "c.jpg", "clip.mp4"]
    assert _names(expand_inputs([root], recursive=True, kinds=["video"])) == ["clip.mp4"]
    # A file named on the command line is taken whatever its extension; duplicates are dropped.
    items = expand_inputs([root / "notes.txt", root, root / "a.jpg"])
    assert _names(items) == ["notes.txt", "a.jpg", "b.PNG"]
    assert items[0].root is None and items[1].root == root
    assert expand_inputs([root], recursive=True)[3].kind == "video"


def test_expand_skips_the_output_folder(tmp_path: Path) -> None:
    root = _tree(tmp_path / "in")
    assert _names(expand_inputs([root], recursive=True, exclude=root / "sub")) == ["a.jpg", "b.PNG"]


def test_expand_errors(tmp_path: Path) -> None:
    with pytest.raises(FaceveilError, match="no such file or folder"):
        expand_inputs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FaceveilError, match="no images or videos"):
        expand_inputs([tmp_path / "empty"])


def test_item_output_path_mirrors_subfolders(tmp_path: Path) -> None:
    root = _tree(tmp_path / "in")
    items = expand_inputs([root], recursive=True)
    outs = [item.output_path(tmp_path / "out", "png") for item in items]
    assert outs[2] == tmp_path / "out" / "sub" / "c.png"
    assert outs[3] == tmp_path / "out" / "sub" / "clip.mp4"
    with pytest.raises(FaceveilError):
        items[0].output_path(root)


def _process(item: BatchItem) -> dict[str, object] | None:
    name = item.path.name
    if name.startswith("err"):
        raise FaceveilError(f"{name}: cannot read image header")
    if name.startswith("bug"):
        raise ValueError("something\nmultiline")
    if name.startswith("skip"):
        raise SkipItem("already veiled")
    if name.startswith("noface"):
        return {"status": "no_face", "faces": 0}
    return {"faces": 2, "output": "somewhere"} if name.startswith("two") else None


def _items(tmp_path: Path, names: list[str]) -> list[BatchItem]:
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    return [BatchItem(tmp_path / name) for name in names]


def test_one_bad_file_never_stops_the_rest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = ["err.jpg", "bug.jpg", "ok.jpg", "skip.jpg", "noface.jpg", "two.jpg"]
    report_path = tmp_path / "report.jsonl"
    report = run_batch(_items(tmp_path, names), _process, report_path=report_path)
    statuses = [r.status for r in report.results]
    assert statuses == ["error", "error", "ok", "skipped", "no_face", "ok"]
    assert report.results[1].message == "ValueError: something multiline"
    assert report.results[5].faces == 2 and report.results[5].output == "somewhere"
    assert report.counts == {"ok": 2, "no_face": 1, "error": 2, "skipped": 1} and report.failed
    lines = [json.loads(line) for line in report_path.read_text().splitlines()]
    assert [line["status"] for line in lines] == statuses
    assert set(lines[0]) == {"file", "status", "message", "faces", "seconds", "output", "details", "converted",
                             "protected", "verdict"}
    err = capsys.readouterr().err
    assert "err.jpg: cannot read image header" in err and "it/s" not in err  # bar off: stderr is not a tty
    assert "Traceback" not in err


def test_quiet_prints_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_batch(_items(tmp_path, ["err.jpg"]), _process, quiet=True)
    assert capsys.readouterr().err == ""


def test_json_report_is_complete(tmp_path: Path) -> None:
    report_path = tmp_path / "reports" / "run.json"
    report = run_batch(_items(tmp_path, ["ok.jpg", "noface.jpg"]), _process, report_path=report_path)
    data = json.loads(report_path.read_text())
    assert data["summary"] == report.counts and not data["interrupted"]
    assert [r["file"] for r in data["results"]] == [str(tmp_path / "ok.jpg"), str(tmp_path / "noface.jpg")]


def test_json_report_starts_with_its_header(tmp_path: Path) -> None:
    report_path = tmp_path / "run.json"
    header = {"command": "protect", "settings": {"seed": 3}}
    run_batch(_items(tmp_path, ["ok.jpg"]), _process, report_path=report_path, header=header)
    data = json.loads(report_path.read_text())
    assert list(data)[:2] == ["command", "settings"] and data["settings"] == {"seed": 3}
    assert len(data["results"]) == 1


def test_unknown_status_is_an_error(tmp_path: Path) -> None:
    report = run_batch(_items(tmp_path, ["a.jpg"]), lambda item: {"status": "great"})
    assert report.results[0].status == "error" and "great" in report.results[0].message


def test_interrupt_returns_partial_report_and_removes_temp_files(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    for index in range(5):
        write_image(np.full((8, 8, 3), index * 40, np.uint8), src / f"p{index}.png")
    calls: list[str] = []

    def veil(item: BatchItem) -> None:
        calls.append(item.path.name)
        target = item.output_path(out)
        if len(calls) == 3:
            atomic.temp_path_for(target).write_bytes(b"half an image")  # a writer caught mid-file
            raise KeyboardInterrupt
        write_image(read_image(item.path), target)

    report_path = out / "report.jsonl"
    report = run_batch(expand_inputs([src]), veil, report_path=report_path)
    assert report.interrupted and report.failed
    assert [r.status for r in report.results] == ["ok", "ok"]
    assert [Path(p).name for p in report.not_done] == ["p2.png", "p3.png", "p4.png"]
    assert sorted(p.name for p in out.iterdir()) == ["p0.png", "p1.png", "report.jsonl"]
    assert len(report_path.read_text().splitlines()) == 2
    assert "interrupted" in report.summary()
