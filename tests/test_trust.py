"""Nothing lost, nothing leaked (issue 24): faceveil attacked as an untrusted user would, item by item. Every case
checks the exact behaviour: exit status, one-line message, what was written (or that nothing was), and that the
originals and unrelated files are byte-identical (sha256 before/after). Fixtures are made here; no photo is
committed. Real processes where the case needs one (signals, a read-only folder)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import WRITTEN, needs_weights
from PIL import Image

import faceveil
from faceveil.cli import main
from faceveil.errors import FaceveilError
from faceveil.io import atomic
from faceveil.pipeline.batch import BatchItem, run_batch
from faceveil.pipeline.job import OutputSettings, plan_files

REPO = Path(__file__).resolve().parents[1]
FAST = ["--strength", "low", "--iters", "1", "--surrogates", "mobileface", "--judges", "mobileface", "--quiet"]


# ----------------------------------------------------------------------------------------------- fixtures


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_shas(root: Path) -> dict[str, str]:
    """sha256 of every regular file under root (links not followed), by relative path."""
    return {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def blank(path: Path, shade: int = 120, size: tuple[int, int] = (80, 60)) -> Path:
    """A small photo with no face in it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), shade, np.uint8)).save(path)
    return path


def face_photo(path: Path) -> Path:
    """A sample photo of the install, downscaled (one face detected fast)."""
    from faceveil.io import weights

    path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(weights.sample_photos()[2]) as im:
        im.convert("RGB").resize((320, 213)).save(path, quality=95)
    return path


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """faceveil in its own process (this checkout's code)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "faceveil.cli", *args], capture_output=True, text=True, env=env,
                          **kwargs)


def without_root_powers() -> list[str]:
    """A command prefix under which permission bits hold (root ignores them unless it drops these capabilities)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be made read-only for root")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


# ----------------------------------------------------------------------------------------------- 1. --recursive


@needs_weights
def test_1_recursive_outputs_mirror_the_subfolders(tmp_path: Path, capsys) -> None:
    """Every file of a sub-folder is written at its mirrored place (the sub-folders were never created)."""
    src = tmp_path / "album"
    face_photo(src / "2019" / "summer" / "people.jpg")
    blank(src / "2020" / "sky.png")
    blank(src / "top.png")
    before = tree_shas(src)
    out = tmp_path / "out"
    assert main(["protect", str(src), "-o", str(out), "--recursive", "--copy-unprotected", *FAST]) in WRITTEN
    assert (out / "2019" / "summer" / "people.jpg").is_file()
    assert (out / "2020" / "sky.png").is_file() and (out / "top.png").is_file()
    assert tree_shas(src) == before
    assert "does not exist" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- 2. one output each


@pytest.mark.parametrize("names, fmt", [
    (["a/x.jpg", "b/x.jpg"], "same"),  # two files named on the command line
    (["x.jpg", "x.png"], "png"),
    (["x.gif", "x.png"], "same"),
    (["X.png", "x.png"], "same"),  # a file system that ignores case would merge them
])
def test_2_two_inputs_never_share_an_output(tmp_path: Path, capsys, names: list[str], fmt: str) -> None:
    inputs = [blank(tmp_path / "in" / n, shade=40 * i) for i, n in enumerate(names)]
    before = {p: sha(p) for p in inputs}
    out = tmp_path / "out"
    report = tmp_path / "r.json"
    assert main(["protect", *map(str, inputs), "-o", str(out), "--format", fmt, "--copy-unprotected",
                 "--json", str(report), *FAST]) == 0
    rows = json.loads(report.read_text())["results"]
    outputs = [r["output"] for r in rows]
    assert len(set(map(str.casefold, outputs))) == len(inputs)
    assert all(Path(o).is_file() for o in outputs)
    renamed = [r for r in rows if "output renamed" in r["message"]]
    assert len(renamed) == len(inputs) - 1
    # each output holds its own input's pixels
    for row in rows:
        assert np.array_equal(np.asarray(Image.open(row["file"]).convert("RGB")),
                              np.asarray(Image.open(row["output"]).convert("RGB")))
    assert {p: sha(p) for p in inputs} == before


def test_2_videos_of_one_name_get_their_own_outputs(tmp_path: Path) -> None:
    """clip.mov and clip.mp4 both become .mp4: the plan gives the second another name and says so."""
    for name in ("clip.mov", "clip.mp4", "clip.mkv"):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"not decoded by the plan")
    plan = plan_files([tmp_path / "in"], tmp_path / "out", OutputSettings())
    outputs = [str(item.output) for item in plan.items]
    assert sorted(outputs) == ["clip-2.mp4", "clip-3.mp4", "clip.mp4"]
    assert next(i for i in plan.items if i.path.name == "clip.mp4").output == Path("clip.mp4")  # keeps its name
    assert sum("output renamed" in item.note for item in plan.items) == 2


# ----------------------------------------------------------------------------------------------- 3. existing files


def test_3_an_existing_file_is_never_overwritten_by_default(tmp_path: Path, capsys) -> None:
    """`protect new_album -o old_album`: the old album's files are not touched; --skip-existing resumes; only
    --overwrite replaces."""
    new = tmp_path / "new_album"
    blank(new / "x.png", 10)
    blank(new / "y.png", 20)
    old = tmp_path / "old_album"
    old.mkdir()
    (old / "x.png").write_bytes(b"the only copy of an old photo")
    (old / "notes.txt").write_text("unrelated")
    old_before, new_before = tree_shas(old), tree_shas(new)
    report = tmp_path / "r.json"
    code = main(["protect", str(new), "-o", str(old), "--copy-unprotected", "--json", str(report), *FAST[:-1]])
    err = capsys.readouterr().err
    assert code == 2
    assert tree_shas(old)["x.png"] == old_before["x.png"] and tree_shas(old)["notes.txt"] == old_before["notes.txt"]
    assert (old / "y.png").is_file()  # the other photo is still done
    rows = {Path(r["file"]).name: r for r in json.loads(report.read_text())["results"]}
    assert rows["x.png"]["status"] == "error" and rows["y.png"]["status"] == "no_face"
    line = [x for x in error_lines(err) if "x.png" in x]
    assert len(line) == 1 and "exists and was not made by this run" in line[0] and "--overwrite" in line[0]

    y_done = sha(old / "y.png")
    assert main(["protect", str(new), "-o", str(old), "--copy-unprotected", "--skip-existing", "--json", str(report),
                 *FAST]) == 0
    rows = {Path(r["file"]).name: r for r in json.loads(report.read_text())["results"]}
    assert rows["x.png"]["status"] == rows["y.png"]["status"] == "skipped"
    assert sha(old / "x.png") == old_before["x.png"] and sha(old / "y.png") == y_done

    assert main(["protect", str(new), "-o", str(old), "--copy-unprotected", "--overwrite", *FAST]) == 0
    assert Image.open(old / "x.png").size == (80, 60)  # replaced, because asked
    assert sha(old / "notes.txt") == old_before["notes.txt"] and tree_shas(new) == new_before


def test_3_the_python_api_follows_the_same_rule(tmp_path: Path) -> None:
    blank(tmp_path / "in" / "x.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.png").write_bytes(b"precious")
    kwargs = {"strength": "low", "surrogates": "mobileface", "judges": "mobileface", "copy_unprotected": True}
    report = faceveil.protect_files([tmp_path / "in"], out, progress=False, **kwargs)
    assert report.results[0].status == "error" and (out / "x.png").read_bytes() == b"precious"
    report = faceveil.protect_files([tmp_path / "in"], out, progress=False, existing="skip", **kwargs)
    assert report.results[0].status == "skipped" and (out / "x.png").read_bytes() == b"precious"
    with pytest.raises(FaceveilError, match="existing"):
        faceveil.Protector(existing="sometimes")


def test_3_atomic_commit_without_replace_refuses_a_file_that_appeared(tmp_path: Path) -> None:
    """The last guard, at the rename itself: a file made meanwhile by someone else is not replaced."""
    target = tmp_path / "x.png"
    with pytest.raises(FaceveilError, match="exists"), atomic.atomic_path(target, replace=False) as temp:
        temp.write_bytes(b"new")
        target.write_bytes(b"someone else's")
    assert target.read_bytes() == b"someone else's" and atomic.live_temp_files() == []


# ----------------------------------------------------------------------------------------------- 4. links, streams


def test_4_report_files_refuse_symlinks_before_any_work(tmp_path: Path, capsys) -> None:
    src = blank(tmp_path / "in" / "x.png")
    victim = tmp_path / "victim.txt"
    victim.write_text("do not replace me")
    for flag, name in (("--json", "r.json"), ("--report", "r.html")):
        link = tmp_path / name
        link.symlink_to(victim)
        code = main(["protect", str(src), "-o", str(tmp_path / "out"), flag, str(link), "--copy-unprotected", *FAST])
        err = error_lines(capsys.readouterr().err)
        assert code == 2 and len(err) == 1 and "refusing to replace the symbolic link" in err[0]
        assert link.is_symlink() and victim.read_text() == "do not replace me"
        assert not (tmp_path / "out" / "x.png").exists()  # refused before the work
    mask_link = tmp_path / "me.fvmask"
    mask_link.symlink_to(victim)
    assert main(["enroll", "--name", "me", str(src), "-o", str(mask_link), "--quiet"]) == 2
    assert "symbolic link" in capsys.readouterr().err and mask_link.is_symlink()
    assert victim.read_text() == "do not replace me"


def test_4_json_to_stdout_and_devices_is_written_through(tmp_path: Path, capsys) -> None:
    src = blank(tmp_path / "in" / "x.png")
    assert main(["protect", str(src), "-o", str(tmp_path / "o1"), "--json", "-", "--copy-unprotected", *FAST]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # only the report on stdout; the table went to stderr
    assert doc["results"][0]["status"] == "no_face" and "| file |" in captured.err
    assert main(["protect", str(src), "-o", str(tmp_path / "o2"), "--json", os.devnull, "--report", os.devnull,
                 "--copy-unprotected", *FAST]) == 0
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)  # still the device, not a regular file


def test_4_dev_stdout_stays_a_link_in_a_real_process(tmp_path: Path) -> None:
    if not Path("/dev/stdout").is_symlink():
        pytest.skip("/dev/stdout is not a link here")
    src = blank(tmp_path / "in" / "x.png")
    done = cli("protect", str(src), "-o", str(tmp_path / "out"), "--json", "/dev/stdout", "--copy-unprotected", *FAST)
    assert done.returncode == 0, done.stderr
    assert '"results"' in done.stdout and Path("/dev/stdout").is_symlink()


# ----------------------------------------------------------------------------------------------- 5. numbers


BAD_FLAGS = [
    ("protect", "--eps", "nan"), ("protect", "--eps", "255"), ("protect", "--eps", "inf"), ("protect", "--eps", "0"),
    ("protect", "--iters", "-5"), ("protect", "--iters", "0"), ("protect", "--alpha", "-1"),
    ("protect", "--momentum", "nan"), ("protect", "--jitter", "-1"), ("protect", "--diversity", "2"),
    ("protect", "--jpeg-quality", "0"), ("protect", "--jpeg-quality", "101"), ("protect", "--batch-faces", "0"),
    ("protect", "--seed", "-1"), ("protect", "--faces", "0"), ("protect", "--smoothing", "4"),
    ("protect", "--gamma", "nan"),
    ("apply", "--mask-index", "-1"), ("apply", "--jpeg-quality", "1000"),
    ("enroll", "--eps", "nan"), ("enroll", "--dropout", "1"), ("enroll", "--iters", "-1"), ("enroll", "--masks", "0"),
    ("serve", "--workers", "0"), ("serve", "--port", "70000"), ("serve", "--max-pending", "0"),
    ("bench serve", "--requests", "0"), ("eval identification", "--limit", "0"),
]


@pytest.mark.parametrize("command, flag, value", BAD_FLAGS)
def test_5_bad_numbers_are_refused_at_parse_time(tmp_path: Path, capsys, command: str, flag: str,
                                                 value: str) -> None:
    positional = {"protect": [str(tmp_path), "-o", str(tmp_path / "out")],
                  "apply": ["m.fvmask", str(tmp_path), "-o", str(tmp_path / "out")],
                  "enroll": ["--name", "x", "a.jpg", "-o", str(tmp_path / "x.fvmask")]}.get(command, [])
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), *positional, f"{flag}={value}"])
    err = error_lines(capsys.readouterr().err)
    assert exit_info.value.code == 2
    assert len(err) == 1 and flag in err[0] and "expected" in err[0], err
    assert not (tmp_path / "out").exists()


def test_5_the_python_api_refuses_the_same_values() -> None:
    for value in (float("nan"), 255.0, -1.0):
        with pytest.raises(FaceveilError, match="eps"):
            faceveil.Protector(eps=value)
    with pytest.raises(FaceveilError, match="iters"):
        faceveil.Protector(iters=0)
    with pytest.raises(FaceveilError, match="jpeg_quality"):
        faceveil.Protector(jpeg_quality=0)


# ----------------------------------------------------------------------------------------------- 6. unwritable output


def test_6_a_read_only_output_folder_fails_before_any_work(tmp_path: Path) -> None:
    prefix = without_root_powers()
    src = blank(tmp_path / "in" / "x.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for out, says in ((locked, "permission denied"), (locked / "sub", "permission denied")):
            start = time.perf_counter()
            done = subprocess.run([*prefix, sys.executable, "-m", "faceveil.cli", "protect", str(src), "-o", str(out),
                                   "--copy-unprotected", *FAST], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
            assert done.returncode == 2, done.stderr
            lines = error_lines(done.stderr)
            assert len(lines) == 1 and says in lines[0] and "Traceback" not in done.stderr
            assert time.perf_counter() - start < 120
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_6_an_output_that_is_a_file_is_one_line(tmp_path: Path, capsys) -> None:
    src = blank(tmp_path / "in" / "x.png")
    existing = tmp_path / "photo.jpg"
    existing.write_bytes(b"a file, not a folder")
    assert main(["protect", str(src), "-o", str(existing), *FAST]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "is a file, not a folder" in err[0]
    assert existing.read_bytes() == b"a file, not a folder"


# ----------------------------------------------------------------------------------------------- 7. the HTML report


@needs_weights
def test_7_report_shows_only_protected_pictures_and_keeps_the_permissions(tmp_path: Path) -> None:
    src = face_photo(tmp_path / "in" / "people.jpg")
    src.chmod(0o600)
    out, report, html = tmp_path / "out", tmp_path / "r.json", tmp_path / "r.html"
    assert main(["protect", str(src), "-o", str(out), "--json", str(report), "--report", str(html), *FAST]) in WRITTEN
    for written in (out / "people.jpg", report, html):
        assert stat.S_IMODE(written.stat().st_mode) & ~0o600 == 0, written  # never more readable than the original
    page = html.read_text()
    faces = json.loads(report.read_text())["results"][0]["faces"]
    assert page.count("<img ") == 1 + faces  # the protected photo and a protected close-up per face
    assert 'alt="original photo"' not in page and "UNPROTECTED" not in page
    assert "shows only the protected pictures" in page
    full = tmp_path / "full.html"
    assert main(["report", str(report), "-o", str(full), "--report-originals", "--quiet"]) == 0
    page = full.read_text()
    assert "UNPROTECTED" in page and page.count("<img ") == 3 + 3 * faces


# ----------------------------------------------------------------------------------------------- 8. crafted results


def test_8_report_embeds_only_files_beside_the_results_file(tmp_path: Path, capsys) -> None:
    secret = blank(tmp_path / "private" / "secret.png", 200)
    secret_sha = sha(secret)
    results = tmp_path / "shared" / "run"
    inside = blank(results / "out" / "ok.png", 90)
    rows = [{"file": str(secret), "output": str(secret), "status": "ok", "details": {"faces": []}},
            {"file": "../../private/secret.png", "output": "../../private/secret.png", "status": "ok",
             "details": {"faces": []}},
            {"file": "out/ok.png", "output": "out/ok.png", "status": "ok", "details": {"faces": []}}]
    link = results / "out" / "link.png"
    link.symlink_to(secret)
    rows.append({"file": "out/link.png", "output": "out/link.png", "status": "ok", "details": {"faces": []}})
    (results / "r.json").write_text(json.dumps({"command": "protect", "results": rows}))
    html = tmp_path / "r.html"
    assert main(["report", str(results / "r.json"), "-o", str(html), "--report-originals", "--quiet"]) == 0
    page = html.read_text()
    assert page.count("outside the folder of the results file") == 3
    assert page.count("<img ") == 3  # before, after, change of the one photo inside
    assert sha(secret) == secret_sha and inside.is_file()


# ----------------------------------------------------------------------------------------------- 9. videos


def _clip(path: Path, seconds: float = 1.0) -> Path:
    """A grey clip with a sine sound track: no face in it."""
    from faceveil.io.video import ffmpeg_exe

    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", f"color=c=gray:s=64x48:d={seconds}",
                    "-f", "lavfi", "-i", f"sine=d={seconds}", "-shortest", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", str(path)], check=True)
    return path


@needs_weights
def test_9_a_video_without_a_face_follows_the_photo_rule(tmp_path: Path) -> None:
    from faceveil.io.video import probe_video

    src = _clip(tmp_path / "in" / "clip.mov")
    before = sha(src)
    report = tmp_path / "r.json"
    assert main(["protect", str(src), "-o", str(tmp_path / "o1"), "--json", str(report), *FAST]) == 0
    row = json.loads(report.read_text())["results"][0]
    assert row["status"] == "no_face" and row["output"] is None and "nothing written" in row["message"]
    assert list((tmp_path / "o1").iterdir()) == []
    assert main(["protect", str(src), "-o", str(tmp_path / "o2"), "--copy-unprotected", *FAST]) == 0
    assert probe_video(tmp_path / "o2" / "clip.mp4").has_audio  # sound kept by default
    assert main(["protect", str(src), "-o", str(tmp_path / "o3"), "--copy-unprotected", "--drop-audio", *FAST]) == 0
    assert not probe_video(tmp_path / "o3" / "clip.mp4").has_audio
    assert sha(src) == before


# ----------------------------------------------------------------------------------------------- 10. interruptions


def _files(tmp_path: Path, n: int) -> list[BatchItem]:
    items = []
    for i in range(n):
        path = tmp_path / f"p{i}.png"
        path.write_bytes(b"x")
        items.append(BatchItem(path))
    return items


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_10_a_signal_stops_the_batch_and_finishes_its_report(tmp_path: Path, signum: int) -> None:
    items = _files(tmp_path, 4)
    half = tmp_path / "out.png"

    def process(item: BatchItem) -> dict:
        if item.path.name == "p1.png":
            atomic.temp_path_for(half).write_bytes(b"half")  # a writer caught mid-file
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the signal arrives before this ends
        return {"output": str(item.path)}

    report_path = tmp_path / "r.json"
    report = run_batch(items, process, report_path=report_path, quiet=True)
    assert report.interrupted and report.signal == signal.Signals(signum).name
    assert [Path(r.file).name for r in report.results] == ["p0.png"]
    assert [Path(p).name for p in report.not_done] == ["p1.png", "p2.png", "p3.png"]
    doc = json.loads(report_path.read_text())
    assert doc["interrupted"] and len(doc["results"]) == 1 and len(doc["not_done"]) == 3
    assert atomic.live_temp_files() == [] and not any(p.suffix == ".part" for p in tmp_path.iterdir())
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handlers are back


def test_10_an_interrupt_that_a_library_swallows_still_stops_the_run(tmp_path: Path) -> None:
    calls = []

    def process(item: BatchItem) -> None:
        calls.append(item.path.name)
        if item.path.name == "p0.png":
            try:  # e.g. a compiler that catches KeyboardInterrupt and carries on
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                pass

    report = run_batch(_files(tmp_path, 3), process, quiet=True)
    assert calls == ["p0.png"] and report.interrupted and len(report.not_done) == 2


def test_10_photos_finished_ahead_get_their_rows_at_once(tmp_path: Path) -> None:
    """Photos optimised together are written together: their rows are in the report as soon as they are written,
    and after an interrupt they are not listed as not done."""
    items = _files(tmp_path, 4)
    report_path = tmp_path / "r.jsonl"

    class Job:
        def __init__(self) -> None:
            self.finished: list = []

        def __call__(self, item: BatchItem) -> dict:
            if item.path.name == "p0.png":  # p0 and p1 in one batch: both written now
                self.finished.append((items[1].path, {"output": "p1-out", "message": "written with p0"}))
                return {"output": "p0-out"}
            rows = [json.loads(line) for line in report_path.read_text().splitlines()]
            assert [Path(r["file"]).name for r in rows] == ["p0.png", "p1.png"]  # streamed already
            raise KeyboardInterrupt

        def take_finished(self) -> list:
            done, self.finished = self.finished, []
            return done

    report = run_batch(items, Job(), report_path=report_path, quiet=True)
    assert [Path(r.file).name for r in report.results] == ["p0.png", "p1.png"]
    assert report.results[1].message == "written with p0"
    assert [Path(p).name for p in report.not_done] == ["p2.png", "p3.png"]


def _dead_pid() -> int:
    for pid in range(4_000_000, 4_100_000):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    pytest.skip("no free process id found")


def test_10_stale_part_files_of_killed_runs_are_removed_on_start(tmp_path: Path) -> None:
    src = blank(tmp_path / "in" / "x.png")
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".clip.mp4.fv{_dead_pid()}.abcd1234.part"  # left by a run killed while encoding
    live = out / f".x.png.fv{os.getpid()}.abcd1234.part"  # another run writing now
    unrelated = out / ".notes.part"
    for path in (stale, live, unrelated):
        path.write_bytes(b"partial")
    report = tmp_path / "r.json"
    assert main(["protect", str(src), "-o", str(out), "--copy-unprotected", "--json", str(report), *FAST]) == 0
    assert not stale.exists() and live.exists() and unrelated.read_bytes() == b"partial"
    assert json.loads(report.read_text())["stale_temp_files_removed"] == 1


@needs_weights
@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_10_a_real_faceveil_process_stopped_by_a_signal(tmp_path: Path, signum: int, status: int) -> None:
    """docker stop / Ctrl-C on a real run: exit 143 / 130, every photo written has its row, no temp files, the
    rest listed as not done, originals untouched."""
    src = tmp_path / "in"
    for i in range(4):
        face_photo(src / f"p{i}.jpg")
    before = tree_shas(src)
    out, report = tmp_path / "out", tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "faceveil.cli", "protect", str(src), "-o", str(out), "--json",
                             str(report), "--batch-faces", "1", "--strength", "low", "--iters", "15", "--surrogates",
                             "mobileface", "--judges", "mobileface", "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(report.read_text())["results"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    doc = json.loads(report.read_text())
    assert doc["interrupted"] and doc["not_done"] and "Traceback" not in err
    written = sorted(p.name for p in out.iterdir())
    assert not any(name.endswith(".part") for name in written)
    assert written == sorted(Path(r["output"]).name for r in doc["results"] if r["output"])
    assert tree_shas(src) == before


# ----------------------------------------------------------------------------------------------- the smaller ones


def test_non_utf8_file_names_reach_the_report(tmp_path: Path, capsys) -> None:
    src = tmp_path / "in"
    name = os.fsdecode(b"caf\xe9.png")
    blank(src / name)
    out, html = tmp_path / "out", tmp_path / "r.html"
    assert main(["protect", str(src), "-o", str(out), "--copy-unprotected", "--report", str(html),
                 "--json", str(tmp_path / "r.json"), *FAST]) == 0
    assert (out / name).is_file() and "caf" in html.read_text()
    assert "caf\ufffd.png" in capsys.readouterr().out


def test_a_symlink_loop_is_one_error_row_not_the_end(tmp_path: Path, capsys) -> None:
    src = tmp_path / "in"
    blank(src / "sub" / "ok.png")
    (src / "sub" / "a.jpg").symlink_to("b.jpg")
    (src / "sub" / "b.jpg").symlink_to("a.jpg")
    (src / "loop").symlink_to(src, target_is_directory=True)
    report = tmp_path / "r.json"
    assert main(["protect", str(src), "-o", str(tmp_path / "out"), "--recursive", "--copy-unprotected",
                 "--json", str(report), *FAST]) == 2
    rows = {Path(r["file"]).name: r["status"] for r in json.loads(report.read_text())["results"]}
    assert rows == {"a.jpg": "error", "b.jpg": "error", "ok.png": "no_face"}
    assert (tmp_path / "out" / "sub" / "ok.png").is_file()
    assert "RuntimeError" not in capsys.readouterr().err


def test_a_full_disk_under_the_report_does_not_stop_the_batch(tmp_path: Path, capsys) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    inputs = [blank(tmp_path / "in" / f"p{i}.png", 30 * i) for i in range(3)]
    streamed = tmp_path / "r.jsonl"
    streamed.symlink_to("/dev/full")  # every write: ENOSPC
    assert main(["protect", *map(str, inputs), "-o", str(tmp_path / "out"), "--json", str(streamed),
                 "--copy-unprotected", *FAST[:-1]]) == 2
    err = capsys.readouterr().err
    assert err.count("No space left on device") == 2  # warned once, and said again at the end
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p0.png", "p1.png", "p2.png"]


def test_error_lines_name_the_path_once(tmp_path: Path, capsys) -> None:
    broken = tmp_path / "in" / "broken.jpg"
    broken.parent.mkdir()
    broken.write_bytes(b"not an image")
    assert main(["protect", str(broken), "-o", str(tmp_path / "out"), *FAST[:-1]]) == 2
    line = [x for x in error_lines(capsys.readouterr().err) if "broken.jpg" in x]
    assert len(line) == 1 and line[0].count("broken.jpg") == 1


def test_verify_explains_a_face_not_found_again() -> None:
    from faceveil.evaluate.verify import NOT_FOUND, display_rows, lost_faces_note

    rows = [{"model": "mobileface", "transform": "none", "face": 0, "score": None, "matches": None, "rank": None},
            {"model": "mobileface", "transform": "none", "face": 1, "score": 0.1, "matches": False, "rank": 4}]
    shown = display_rows(rows)
    assert shown[0]["score"] == NOT_FOUND and shown[1]["score"] == "0.1000"
    assert lost_faces_note(rows).startswith("face 0: not re-detected")


def test_an_encode_that_fails_on_the_source_blames_the_source() -> None:
    from faceveil.io.video import encoder_error

    log = "[aac @ 0x1] Error while decoding stream #1:0: Invalid data found when processing input"
    assert str(encoder_error(log, "Invalid data", Path("out/c.mp4"), Path("in/c.mp4"))).startswith(
        "in/c.mp4: damaged input")
    assert str(encoder_error("x264 failed", "x264 failed", Path("out/c.mp4"), Path("in/c.mp4"))).startswith(
        "cannot encode out/c.mp4")
