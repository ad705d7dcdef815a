"""Data safety through the command line: whatever happens (a refusal, Ctrl-C, SIGTERM, SIGKILL at
the worst instant), every directory and input the user had survives byte for byte, nothing outside
mqtool's own output is ever deleted, and what an interrupted run leaves is swept or restored by the
next write, never accepted by a later stage as a checkpoint."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mqtool
from helpers import run_cli as run

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one thread, restored after

TINY = ["init", "tiny-mamba1"]  # a 3M-parameter random checkpoint: written in well under a second
CALIB = ["calibrate", "demo", "--data", "demo", "--samples", "2", "--seqlen", "16", "--state-samples", "0",
         "--device", "cpu"]


def tree(root: Path) -> dict[str, str]:
    """Every file and directory under root (hidden ones too), files by their sha256."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            found[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            found[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return found


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def user_files(d: Path) -> Path:
    """A directory of the user's that mqtool did not write."""
    (d / "data").mkdir(parents=True)
    (d / "notes.txt").write_text("my notes\n")
    (d / "data" / "x.bin").write_bytes(bytes(range(256)))
    (d / ".hidden").write_text("h")
    return d


# A real `mqtool` process, made to stop at a chosen instant of its save: `hang` once the temporary
# holds everything (it writes the temporary's path to MARKER, then sleeps), `die-between-renames`
# by SIGKILL between the two renames of a --force replace (the kernel's one-step swap turned off).
CHILD = r"""
import os, signal, sys, time
from pathlib import Path
import mqtool.atomic, mqtool.calibrate, mqtool.checkpoint

mode, marker, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]

def hang_after(fill):
    def wrapped(*a, **kw):
        fill(*a, **kw)
        tmp = next(x for x in a if isinstance(x, Path) and ".tmp-" in x.name)
        marker.write_text(str(tmp))
        time.sleep(120)
    return wrapped

if mode == "hang":
    mqtool.checkpoint._save_sharded = hang_after(mqtool.checkpoint._save_sharded)
    mqtool.calibrate.Calibration.save = hang_after(mqtool.calibrate.Calibration.save)
elif mode == "die-between-renames":
    mqtool.atomic._exchange = lambda a, b: False
    real_rename = Path.rename
    def rename(self, target):
        if ".tmp-" in self.name and any(".old-" in n for n in os.listdir(self.parent)):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(self, target)
    Path.rename = rename

from mqtool.cli import main
sys.argv = ["mqtool", *args]
main()
"""


def child(tmp_path: Path, mode: str, *args: str) -> tuple[subprocess.Popen, Path]:
    script, marker = tmp_path / "child.py", tmp_path / "marker"
    script.write_text(CHILD)
    src = str(Path(mqtool.__file__).parents[1])  # the mqtool these tests import
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), mode, str(marker), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, marker


def wait_for(marker: Path, proc: subprocess.Popen) -> Path:
    deadline = time.monotonic() + 120
    while not marker.exists() or not marker.read_text():
        if proc.poll() is not None:
            pytest.fail(f"the child exited ({proc.returncode}) before its save: {proc.stderr.read()}")
        assert time.monotonic() < deadline, "the child never reached its save"
        time.sleep(0.05)
    return Path(marker.read_text())


def leftovers(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if ".tmp-" in n or ".old-" in n)


# ------------------------------------------------------------------ a kill during the save


@pytest.mark.parametrize(("what", "sig", "code", "said"), [
    ("checkpoint", signal.SIGTERM, 143, "terminated"),
    ("checkpoint", signal.SIGINT, 130, "interrupted"),
    ("calibration", signal.SIGTERM, 143, "terminated"),
])
def test_signal_during_a_save_removes_the_temporary_and_keeps_the_old_output(capsys, tmp_path, what, sig, code,
                                                                             said):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    cmd = [*TINY, "-o", str(out)] if what == "checkpoint" else [*CALIB, "-o", str(out)]
    assert run(capsys, *cmd)[0] == 0
    before = tree(work)
    proc, marker = child(tmp_path, "hang", *cmd, "--force")
    tmp = wait_for(marker, proc)
    # the temporary is a full copy, named after its process
    assert tmp.parent == work and tmp.name.startswith(f".out.tmp-{proc.pid}-")
    assert sum(f.stat().st_size for f in tmp.iterdir()) > 1_000_000
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == said and "Traceback" not in stderr
    assert leftovers(work) == [] and tree(work) == before  # no temporary; the old output byte for byte


def test_sigkill_during_a_save_is_swept_by_the_next_write(capsys, tmp_path):
    """SIGKILL cannot be caught: its temporary stays, the old output is intact and still reads,
    and the next write to the same output removes the temporary."""
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    assert run(capsys, *TINY, "-o", str(out))[0] == 0
    before, old = tree(work), tree(out)
    proc, marker = child(tmp_path, "hang", *TINY, "-o", str(out), "--force", "--seed", "1")
    tmp = wait_for(marker, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert tmp.is_dir() and leftovers(work) == [tmp.name]
    assert {k: v for k, v in tree(work).items() if not k.startswith(".")} == before
    code, _, err = run(capsys, "info", str(tmp))  # a temporary is no checkpoint a stage accepts
    assert code == 2 and err.startswith("error:") and "interrupted" in err
    assert run(capsys, *TINY, "-o", str(out), "--force", "--seed", "1")[0] == 0
    assert leftovers(work) == [] and tree(out).keys() == old.keys() and tree(out) != old


def test_kill_between_the_two_renames_is_recovered(capsys, tmp_path):
    """The one instant where `out` is missing: the previous copy is hidden, complete, pointed at by
    the error of a reader, and put back by the next write (which refuses without --force)."""
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    assert run(capsys, *TINY, "-o", str(out))[0] == 0
    before, old = tree(work), tree(out)
    proc, _ = child(tmp_path, "die-between-renames", *TINY, "-o", str(out), "--force", "--seed", "1")
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    hidden = work / f".out.old-{proc.pid}"
    assert not out.exists() and tree(hidden) == old  # complete: the previous checkpoint, byte for byte
    code, _, err = run(capsys, "info", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1 and hidden.name in err
    code, _, err = run(capsys, "info", str(hidden))  # read under its hidden name: refused, not trusted
    assert code == 2 and "interrupted" in err
    code, _, err = run(capsys, *TINY, "-o", str(out))  # no --force: refused, but the old copy is back
    assert code == 2 and "restored" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert leftovers(work) == [] and tree(work) == before
    assert run(capsys, *TINY, "-o", str(out), "--force", "--seed", "1")[0] == 0
    assert leftovers(work) == [] and tree(out).keys() == old.keys() and tree(out) != old


def test_a_forced_write_after_a_kill_between_renames_replaces_the_restored_copy(capsys, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    assert run(capsys, *TINY, "-o", str(out))[0] == 0
    pid = dead_pid()
    out.rename(work / f".out.old-{pid}")  # the state a kill between the renames leaves
    (work / f".out.tmp-{pid}-abc123").mkdir()
    assert run(capsys, *TINY, "-o", str(out), "--force", "--seed", "2")[0] == 0
    assert leftovers(work) == [] and (out / "model.safetensors").exists()


# ------------------------------------------------------------------ sweeping leftovers


def test_the_next_write_sweeps_only_our_leftovers_of_dead_processes(capsys, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    assert run(capsys, *TINY, "-o", str(out))[0] == 0
    dead, alive = dead_pid(), os.getppid()
    stale = [f".out.tmp-{dead}-k2j4_x9q", f".out.old-{dead}"]  # ours, their process gone: `out` is in place
    kept = [f".out.tmp-{alive}-k2j4_x9q", f".out.old-{alive}",  # a live process's write in progress
            ".other", ".out.tmp-k2j4_x9q", f".out.tmp-{dead}", f".out.tmp-{dead}-a.keep",  # not our pattern
            f".out2.tmp-{dead}-k2j4_x9q", f".ou.old-{dead}", f"out.old-{dead}"]  # another output's, or not hidden
    for name in stale + kept:
        (work / name).mkdir()
        (work / name / "model.safetensors").write_bytes(b"partial")
    (work / "file.old-1").write_text("a file of the user's")
    before = {k: v for k, v in tree(work).items() if not k.startswith(tuple(stale))}
    assert run(capsys, *TINY, "-o", str(out), "--force", "--seed", "1")[0] == 0
    after = tree(work)
    assert not any(k.startswith(tuple(stale)) for k in after)
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == \
        {k: v for k, v in before.items() if not k.startswith("out/")}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_forced_replace_leaves_only_the_new_output(capsys, tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr("mqtool.atomic._exchange", lambda a, b: False)
    for what, cmd in (("checkpoint", TINY), ("calibration", CALIB)):
        out = tmp_path / what
        assert run(capsys, *cmd, "-o", str(out))[0] == 0
        first = tree(out)
        code, _, err = run(capsys, *cmd, "-o", str(out), "--force", "--seed", "3")
        assert code == 0, err
        assert tree(out) != first and leftovers(tmp_path) == []
        assert all(oct(p.stat().st_mode & 0o777) == oct(0o666 & ~_umask()) for p in out.iterdir())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------ refusals keep everything


def test_force_onto_a_directory_mqtool_did_not_write_is_refused(capsys, tmp_path):
    mine = user_files(tmp_path / "mine")
    before = tree(tmp_path)
    for cmd in (TINY, CALIB):
        code, _, err = run(capsys, *cmd, "-o", str(mine), "--force")
        assert code == 2 and "not an mqtool checkpoint" in err and len(err.strip().splitlines()) == 1
    assert tree(tmp_path) == before


def test_a_stage_never_writes_over_or_around_its_input(capsys, tmp_path):
    proj = tmp_path / "proj"
    inp = proj / "in"
    assert run(capsys, "quantize", "demo", "--weights", "8", "-o", str(inp), "--device", "cpu")[0] == 0
    user_files(proj / "mine")
    before = tree(tmp_path)
    for out in (proj, inp, inp / "sub", tmp_path):
        code, _, err = run(capsys, "export", str(inp), "-o", str(out), "--force")
        assert code == 2 and "overlaps" in err and len(err.strip().splitlines()) == 1, (out, err)
        code, _, err = run(capsys, "quantize-states", str(inp), "--bits", "8", "-o", str(out), "--force")
        assert code == 2 and "overlaps" in err, (out, err)
    assert tree(tmp_path) == before


def test_reconstruct_keeps_the_users_files_in_its_state_dir(capsys, tmp_path):
    q, h, r = tmp_path / "q", tmp_path / "h", tmp_path / "r"
    assert run(capsys, "quantize", "demo", "--weights", "8", "-o", str(q), "--device", "cpu")[0] == 0
    assert run(capsys, "quantize-states", str(q), "--bits", "8", "-o", str(h))[0] == 0
    w = user_files(tmp_path / "w")
    before_w, before_h = tree(w), tree(h)
    esr = ["--calib-data", "demo", "--samples", "2", "--seqlen", "16", "--epochs", "1", "--device", "cpu"]
    for sdir in (h, r, tmp_path):  # the input, the output, or a directory holding them: refused
        code, _, err = run(capsys, "reconstruct", str(h), "-o", str(r), "--state-dir", str(sdir), *esr)
        assert code == 2 and "overlaps" in err, (sdir, err)
    code, _, err = run(capsys, "reconstruct", str(h), "-o", str(r), "--state-dir", str(w), *esr)
    assert code == 0, err
    assert tree(w) == before_w and tree(h) == before_h  # its own state files gone, the user's kept
    assert (r / "mqtool.json").exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------ failing early, exit codes


def _no_compute(*a, **kw):
    raise AssertionError("the stage computed before finding that its output cannot be written")


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_unwritable_output_fails_before_compute(capsys, tmp_path, monkeypatch, where):
    if where == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory")
    monkeypatch.setattr("mqtool.pipeline.run_stage", _no_compute)
    monkeypatch.setattr("mqtool.calibrate.calibrate", _no_compute)
    parent = tmp_path / "p"
    if where == "under-a-file":
        parent.write_text("a file")
        out = parent / "sub" / "out"
    else:
        parent.mkdir()
        parent.chmod(0o555)
        out = parent / "out"
    try:
        for cmd in (["quantize", "demo", "--weights", "8", "--device", "cpu"], CALIB):
            code, _, err = run(capsys, *cmd, "-o", str(out))
            assert code == 2 and "cannot create" in err and len(err.strip().splitlines()) == 1, err
    finally:
        if where == "read-only":
            parent.chmod(0o755)


def test_interrupt_during_compute_exits_130_and_writes_nothing(capsys, tmp_path, monkeypatch):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("mqtool.pipeline.run_stage", interrupted)
    code, _, err = run(capsys, "quantize", "demo", "--weights", "8", "-o", str(tmp_path / "q"), "--device", "cpu")
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted"
    assert os.listdir(tmp_path) == []
