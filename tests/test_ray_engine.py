"""`faceveil protect --engine ray` on a real local Ray cluster (`ray start --head` on 127.0.0.1, in a temporary
directory, stopped at the end): the same files, byte for byte, and the same report rows as the local engine; a bad
file is one error row; an actor killed mid-batch has its photos redone, with no duplicate or partial file.
`faceveil eval identification|robustness --engine ray` (the tip-im protocol's masks computed by the actors): the
local engine's rows."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from faceveil.io import weights
from tests.conftest import LFW_ROOT, needs_lfw, needs_weights

REPO = Path(__file__).resolve().parents[1]
RAY_MISSING = importlib.util.find_spec("ray") is None
NO_RAY = "Ray is not installed: pip install 'faceveil[ray]' (./setup.sh does)"
needs_ray = pytest.mark.skipif(RAY_MISSING, reason=NO_RAY)
CHEAP = ["--strength", "low", "--iters", "2", "--judges", "mobileface", "--batch-faces", "1", "--seed", "3"]
# One intra-op thread, as each actor has (torch's float sums depend on the thread count).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
STOP_WAIT_S = 15


def test_engine_ray_without_ray_is_one_line_naming_the_extra(tmp_path: Path, monkeypatch, capsys):
    from faceveil.cli.main import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails as it does where Ray is not installed
    code = main(["protect", str(tmp_path), "-o", str(tmp_path / "out"), "--engine", "ray", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "faceveil[ray]" in err, err


@pytest.mark.parametrize("command", [["eval", "identification"], ["eval", "robustness"]])
def test_eval_engine_ray_without_ray_is_one_line_naming_the_extra(command: list[str], tmp_path: Path, monkeypatch,
                                                                   capsys):
    from faceveil.cli.main import main

    (tmp_path / "images").mkdir()
    monkeypatch.setitem(sys.modules, "ray", None)
    code = main([*command, "--dataset", f"lfw={tmp_path}", "--engine", "ray", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "faceveil[ray]" in err, err


@pytest.mark.parametrize("command", [["eval", "identification"], ["eval", "robustness"]])
def test_eval_engine_ray_with_another_protocol_is_one_line(command: list[str], tmp_path: Path, capsys):
    from faceveil.cli.main import main

    (tmp_path / "images").mkdir()
    code = main([*command, "--protocol", "opom", "--dataset", f"lfw={tmp_path}", "--engine", "ray", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "tip-im" in err, err


def test_masks_come_back_in_job_order_once_and_a_failed_cluster_is_one_error():
    import pickle

    import numpy as np
    import torch

    from faceveil.distributed.ray_eval import _in_order
    from faceveil.errors import FaceveilError

    def row(index: int) -> dict:
        return {"index": index, "mask": pickle.dumps(np.full((1, 2), index, dtype=np.float32))}

    got = list(_in_order(iter([row(2), row(0), row(0), row(1)]), 3))  # as jobs finish; job 0 retried
    assert [float(m[0, 0]) for m in got] == [0.0, 1.0, 2.0] and all(m.dtype == torch.float32 for m in got)
    with pytest.raises(FaceveilError, match="1 of 2"):
        list(_in_order(iter([row(0)]), 2))

    def broken():
        yield row(0)
        raise RuntimeError("actor\nlost")

    with pytest.raises(FaceveilError, match="^ray: actor lost$"):
        list(_in_order(broken(), 2))


def test_temp_files_a_dead_actor_left_are_swept_and_nothing_else(tmp_path: Path):
    from faceveil.distributed.ray_engine import sweep_temp_files
    from faceveil.pipeline.batch import BatchItem

    (tmp_path / "in" / "sub").mkdir(parents=True)
    item = BatchItem(tmp_path / "in" / "sub" / "a.jpg", tmp_path / "in")
    out = tmp_path / "out" / "sub"
    out.mkdir(parents=True)
    left = [out / ".a.jpg.x1y2.part", out / ".b.jpg.x1y2.part", out / "a.jpg"]  # a's temp file, another's, a's output
    for path in left:
        path.write_bytes(b"x")
    assert sweep_temp_files([item], tmp_path / "out", "same") == [left[0]]
    assert sorted(p.name for p in out.iterdir()) == [".b.jpg.x1y2.part", "a.jpg"]


# ----------------------------------------------------------------------------------------------- the cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_of(marker: str) -> list[int]:
    """Our cluster's daemons (their command lines name its temp dir) and their children (the workers)."""
    parents: dict[int, int] = {}
    ours: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if marker in cmdline and int(entry.name) != os.getpid():
            ours.add(int(entry.name))
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in ours} - ours
        ours |= children
        grew = bool(children)
    return sorted(ours)


def _worker_pids(marker: str, title: str) -> list[int]:
    found = []
    for pid in _processes_of(marker):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title.encode()):
                found.append(pid)
        except OSError:
            continue
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def ray_cluster():
    """A real Ray head on 127.0.0.1 with 2 CPUs; yields (address, environment for drivers, temp dir)."""
    if RAY_MISSING:
        pytest.skip(NO_RAY)
    temp = tempfile.mkdtemp(prefix="fvr", dir="/tmp")  # short: Ray's socket paths must stay under 108 characters
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,  # never a token file in the user's home
           "RAY_worker_niceness": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    ray_bin = Path(sys.executable).with_name("ray")
    started = subprocess.run(
        [str(ray_bin), "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--temp-dir", temp,
         "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats", "--object-store-memory",
         str(256 * 1024 * 1024)], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        yield f"127.0.0.1:{port}", env, temp
    finally:
        _stop(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _stop(marker: str) -> None:
    """What `ray stop` does, for this cluster's processes only (by their ids): SIGTERM, then SIGKILL what is left
    (a raylet still starting workers is asked again)."""
    _signal_all(_processes_of(marker), signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline and _processes_of(marker):
        time.sleep(0.5)
    for _ in range(10):
        left = _processes_of(marker)
        if not left:
            return
        _signal_all(left, signal.SIGKILL)
        time.sleep(1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three sample photos at 640 px (cheap to detect in) and a file that is not an image."""
    folder = tmp_path_factory.mktemp("ray-in")
    for path in weights.sample_photos()[:3]:
        with Image.open(path) as im:
            im.thumbnail((640, 640))
            im.save(folder / path.name, quality=95)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


def _protect(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "faceveil.cli", "protect", *args, *CHEAP, "--quiet"]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def local_run(photos: Path, tmp_path_factory):
    """The local engine on one thread: the reference files and report."""
    work = tmp_path_factory.mktemp("ray-local")
    env = {**os.environ, **ONE_THREAD,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = _protect([str(photos), "-o", "out", "--json", "report.json"], env, work)
    return work, done


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _rows(report: dict) -> list[dict]:
    """The report rows without what depends on the machine's speed."""
    rows = []
    for row in report["results"]:
        details = {k: v for k, v in (row["details"] or {}).items() if k != "seconds_per_face"}
        rows.append({**{k: v for k, v in row.items() if k != "seconds"}, "details": details})
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
@needs_ray
@needs_weights
def test_ray_engine_writes_the_local_engines_files_and_rows(ray_cluster, photos: Path, local_run, tmp_path: Path):
    address, env, _ = ray_cluster
    local_dir, local = local_run
    done = _protect([str(photos), "-o", "out", "--json", "report.json", "--engine", "ray", "--address", address,
                     "--workers", "2"], env, tmp_path)
    assert (done.returncode, local.returncode) == (2, 2), done.stderr[-2000:]  # the broken file fails both runs
    assert _files(tmp_path / "out") == _files(local_dir / "out")  # byte-identical, same names
    ray_report = json.loads((tmp_path / "report.json").read_text())
    local_report = json.loads((local_dir / "report.json").read_text())
    assert _rows(ray_report) == _rows(local_report)
    assert ray_report["summary"] == local_report["summary"] == {"ok": 3, "no_face": 0, "error": 1, "skipped": 0}
    broken = [row for row in ray_report["results"] if row["status"] == "error"]
    assert [Path(row["file"]).name for row in broken] == ["broken.jpg"] and "not a supported image" in broken[0][
        "message"]


@pytest.mark.slow
@needs_ray
@needs_weights
def test_a_killed_actor_has_its_photos_redone_without_duplicate_or_partial_files(ray_cluster, photos: Path,
                                                                               local_run, tmp_path: Path):
    address, env, temp = ray_cluster
    local_dir, _ = local_run
    out = tmp_path / "out"
    command = [sys.executable, "-m", "faceveil.cli", "protect", str(photos), "-o", str(out), *CHEAP, "--quiet",
               "--json", str(tmp_path / "rows.jsonl"), "--engine", "ray", "--address", address, "--workers", "1"]
    run = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    try:
        deadline = time.monotonic() + 600
        while killed is None and run.poll() is None and time.monotonic() < deadline:
            actors = _worker_pids(temp, "ray::MapWorker")
            # mid-batch: the actor has written a photo of its batch (4 files, one call) but not all of them
            if actors and out.is_dir() and any(p.suffix == ".jpg" for p in out.iterdir()):
                written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
                os.kill(actors[0], signal.SIGKILL)
                killed = (actors[0], written)
            time.sleep(0.05)
        stdout, stderr = run.communicate(timeout=900)
    finally:
        if run.poll() is None:
            run.kill()
    assert killed is not None, "the actor finished before it could be killed"
    assert len(killed[1]) < 3, f"killed after every photo was written: {killed[1]}"
    assert run.returncode == 2, stderr[-2000:]  # the broken file's error row, nothing else failed
    rows = _read_jsonl(tmp_path / "rows.jsonl")
    assert sorted(Path(row["file"]).name for row in rows) == sorted(p.name for p in photos.iterdir())  # once each
    assert [row["status"] for row in rows].count("ok") == 3
    assert sorted(p.name for p in out.iterdir()) == sorted(_files(local_dir / "out"))  # no .part file left
    assert _files(out) == _files(local_dir / "out")  # redone whole: the same bytes as the local engine


# ----------------------------------------------------------------------------------------------- evaluations

# The smallest tip-im protocol run that still spreads: 2 probes in batches of 1 (two jobs for two actors), a
# targeted method (the actors build the target set), 2 iterations.
EVAL_CHEAP = ["--protocol", "tip-im", "--method", "tip-im", "--limit", "2", "--extra", "5", "--iters", "2",
              "--surrogates", "mobileface", "--judges", "mobileface", "--batch", "1", "--seed", "3", "--quiet"]
ROBUSTNESS_CHEAP = ["--transforms", "jpeg75"]


def _evaluate(command: list[str], args: list[str], env: dict, cwd: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "faceveil.cli", *command, "--dataset", f"lfw={LFW_ROOT}",
                           *EVAL_CHEAP, *args, "--json", "out.json"], env={**env, **ONE_THREAD}, cwd=cwd,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((cwd / "out.json").read_text())


@pytest.mark.slow
@needs_ray
@needs_weights
@needs_lfw
@pytest.mark.parametrize("command", [["eval", "identification"], ["eval", "robustness"]])
def test_eval_on_ray_gives_the_local_engines_rows(command: list[str], ray_cluster, tmp_path: Path):
    address, env, _ = ray_cluster
    extra = ROBUSTNESS_CHEAP if command[1] == "robustness" else []
    (tmp_path / "local").mkdir()
    (tmp_path / "ray").mkdir()
    local = _evaluate(command, extra, env, tmp_path / "local")
    ray = _evaluate(command, [*extra, "--engine", "ray", "--address", address, "--workers", "2"], env,
                    tmp_path / "ray")
    assert ray["rows"] and ray["rows"] == local["rows"]  # every float equal: the masks are the local ones, bit for bit
    assert (local["settings"]["engine"], ray["settings"]["engine"]) == ("local", "ray")
