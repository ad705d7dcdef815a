"""Writing an output directory so that no kill, at any instant, loses or half-writes it.

Everything goes into a temporary sibling `.NAME.tmp-<pid>-XXXX`, which takes `NAME`'s place only
when complete. Replacing an existing `NAME` swaps the two in one step where the kernel can
(renameat2 RENAME_EXCHANGE); elsewhere the old copy is first renamed to `.NAME.old-<pid>`, so at
every instant `NAME` is either a complete copy (old or new) or missing with the complete old copy
under that name. A later write to `NAME` (or a check before one) sweeps what a dead process of
ours left beside it: temporaries go, an old copy goes back to `NAME` if that is missing. Nothing
else is ever touched: only names of exactly this pattern, and only those whose process is gone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mqtool.errors import MqtoolError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _leftovers(out: Path) -> tuple[list[Path], list[Path]]:
    """(temporaries, old copies) beside `out` that a process of ours, now dead, left behind."""
    name = re.escape(out.name)
    tmp_re = re.compile(rf"\.{name}\.tmp-(\d+)-[A-Za-z0-9_]+")  # mkdtemp's suffix alphabet
    old_re = re.compile(rf"\.{name}\.old-(\d+)")
    tmps, olds = [], []
    try:
        names = os.listdir(out.parent)
    except OSError:  # no parent yet: nothing left behind
        return [], []
    for n in sorted(names):
        for pattern, found in ((tmp_re, tmps), (old_re, olds)):
            m = pattern.fullmatch(n)
            if m and not _pid_alive(int(m.group(1))):
                found.append(out.parent / n)
    return tmps, olds


def leftover_of(path: Path) -> str | None:
    """The output name whose temporary or hidden old copy `path` is (by its name), else None."""
    m = re.fullmatch(r"\.(.+)\.(?:tmp-\d+-[A-Za-z0-9_]+|old-\d+)", path.name)
    return m.group(1) if m else None


def interrupted_copy(out: Path) -> Path | None:
    """The previous copy of a missing `out` that a killed --force replace left hidden, if any."""
    olds = _leftovers(out)[1]
    return olds[0] if olds and not out.exists() and not out.is_symlink() else None


def sweep(out: Path) -> Path | None:
    """Cleans up after a dead process of ours that was writing `out`: a hidden old copy goes back
    to `out` when `out` is missing (then returns it), its temporaries and outdated old copies go."""
    tmps, olds = _leftovers(out)
    restored = None
    if olds and not out.exists() and not out.is_symlink():
        olds[0].rename(out)  # the kill came between the two renames: the previous copy was complete
        restored, olds = olds[0], olds[1:]
    for p in tmps + olds:  # an old copy with `out` in place: the replace had finished
        _remove(p)
    return restored


def _remove(p: Path) -> None:
    if p.is_symlink():  # `out` was a link, and the link is what got moved
        p.unlink()
    else:
        shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one step; False where the kernel or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(e, os.strerror(e), str(a))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_dir_atomic(out: Path, fill: Callable[[Path], None], replace: bool) -> Path:
    """Calls `fill(tmp)` on a fresh temporary sibling of `out`, then moves it into place,
    replacing an existing `out` only when `replace`. On any exception (KeyboardInterrupt and a
    SIGTERM turned into one included) the temporary goes and an existing `out` is as it was."""
    out = Path(out).expanduser()
    sweep(out)
    if out.exists() and not replace:
        raise MqtoolError(f"{out} exists; pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    old: Path | None = None
    try:
        fill(tmp)
        mode = 0o666 & ~_umask()
        for f in tmp.rglob("*"):  # temp files may be private; an output is ordinary files
            if f.is_file():
                f.chmod(mode)
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; an output is an ordinary directory
        if not out.exists():
            tmp.rename(out)
        elif _exchange(tmp, out):
            _remove(tmp)  # now the old copy; killed midway, a later sweep ends it
        else:
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            done = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
            old.rename(done)  # so that an `.old-` name always holds a complete copy
            old = None
            _remove(done)
    except BaseException:
        _remove(tmp)
        if old is not None and old.exists() and not out.exists():
            old.rename(out)  # the new one never got into place: put the previous one back
        raise
    return out
