"""The output contract: every file and folder simdiff writes goes through this module.

- **Validate at start**: every output path is checked before any model work (not empty, ``.``, ``/`` or a
  folder holding the current or home folder; a known extension for files; a writable parent).
- **Claim at start**: a folder output is claimed by a lock file beside it (``.NAME.simdiff-lock``, an
  ``flock`` holding our pid), so a second run to the same path fails at once with one line.
- **Replace only what is ours**: ``overwrite`` replaces a folder only when it is empty or a previous simdiff
  output (it holds ``simdiff.json``), and a file only when it is a regular file; never anything that is,
  contains or lies inside an input model or the model caches.
- **Atomic commit**: the result is written into ``.NAME.tmp-PID-*`` beside the target and renamed into place
  at the end. A folder or file that appeared at the target during the run is detected and kept untouched.
- **Leftovers**: ``.NAME.tmp-PID-*`` / ``.NAME.old-PID`` of a process that is gone (killed) are removed by the
  next run to the same path; a ``.NAME.old-PID`` whose target is missing is renamed back (it is the previous
  output, and the run that was replacing it died before renaming the new one in).
- **Failures at save** (full disk, read-only or unwritable folder) become one :class:`SimdiffError` line and
  leave nothing behind.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from simdiff.core.errors import SimdiffError

log = logging.getLogger(__name__)

MARKER = "simdiff.json"  # every folder simdiff writes holds it; --overwrite replaces only such folders
LOCK_SUFFIX = ".simdiff-lock"
JSON_SUFFIXES = (".json",)
PLOT_SUFFIXES = (".png", ".svg", ".pdf")
FAULT_ENV = "SIMDIFF_FAULT_AT"  # tests only: kill the process with SIGKILL at the named step of a save
NO_FLOCK_ERRNOS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
MIN_FREE_BYTES = 1 << 20
_LEFTOVER = re.compile(r"(?P<kind>tmp|old)-(?P<pid>\d+)(?:-.*)?")

Inputs = Iterable[str | os.PathLike | None]


def fault_point(step: str, truncate: Path | None = None) -> None:
    """Test hook: with ``SIMDIFF_FAULT_AT=step`` the process dies here by SIGKILL, as in a crash.

    ``truncate``: first cut that file to half its size (the state a kill during its write leaves).
    """
    if os.environ.get(FAULT_ENV) != step:
        return
    if truncate is not None and truncate.is_file():
        os.truncate(truncate, truncate.stat().st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


# -- validation -----------------------------------------------------------------------------------------
def _usable(out: str | os.PathLike | None, flag: str) -> Path:
    """The path itself must be a new or replaceable name: not empty, not ``/``, not above cwd or home."""
    text = "" if out is None else os.fspath(out)
    if not text.strip():
        raise SimdiffError(f"{flag} is empty; give a file or folder name")
    path = Path(text).expanduser()
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        raise SimdiffError(f"{flag} {text!r} is the root folder; choose a new folder")
    for keep, what in ((Path.cwd(), "current folder"), (Path.home(), "home folder")):
        if keep.resolve().is_relative_to(resolved):
            raise SimdiffError(f"{flag} {text!r} is or contains the {what} ({keep}); choose a new folder")
    return path


def input_locations(inputs: Inputs) -> list[Path]:
    """Local paths of the input models/files (built-in names map to their cached checkpoint)."""
    from simdiff.core.cache import BUILTIN_MODELS, cache_dir

    found = []
    for name in inputs:
        if not name:
            continue
        name = os.fspath(name)
        path = cache_dir() / "models" / name if name in BUILTIN_MODELS else Path(name).expanduser()
        if path.exists():
            found.append(path.resolve())
    return found


def cache_locations() -> list[Path]:
    """The model caches simdiff reads from: its own (built-in models) and the Hugging Face hub cache."""
    from simdiff.core.cache import cache_dir

    paths = [cache_dir().expanduser()]
    try:
        from huggingface_hub import constants

        paths.append(Path(constants.HF_HUB_CACHE).expanduser())
    except ImportError:
        pass
    return [p.resolve() for p in paths]


def check_not_protected(path: Path, inputs: Inputs = (), protect_cache: bool = True, flag: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside an input model (or file) or a model cache."""
    resolved = path.resolve()
    protected = [(p, "the input") for p in input_locations(inputs)]
    if protect_cache:
        protected += [(p, "the model cache") for p in cache_locations()]
    for location, what in protected:
        if resolved == location or resolved.is_relative_to(location) or location.is_relative_to(resolved):
            raise SimdiffError(f"{flag} {str(path)!r} overlaps {what} {str(location)!r}; simdiff never writes "
                               "into or over its inputs or the model cache: choose a path outside it")


def check_parent_writable(path: Path, flag: str = "--out") -> None:
    """The nearest existing ancestor of ``path`` must be a folder we may create entries in."""
    parent = path.parent.resolve()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SimdiffError(f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SimdiffError(f"{flag} {str(path)!r}: folder {str(parent)!r} is not writable (read-only or no "
                           "permission); choose another location")


def check_replaceable(path: Path, marker: str = MARKER, flag: str = "--out") -> None:
    """``--overwrite`` replaces an empty folder or one holding ``marker`` (a previous simdiff output) only."""
    if not path.is_dir():
        raise SimdiffError(f"output {str(path)!r} exists and is not a directory")
    if any(path.iterdir()) and not (path / marker).is_file():
        raise SimdiffError(f"{flag} {str(path)!r} is not a simdiff output (no {marker}) and not empty; "
                           "--overwrite replaces only earlier simdiff outputs: move it away or choose another path")


def check_output_dir(out: str | os.PathLike, overwrite: bool = False, inputs: Inputs = (), marker: str = MARKER,
                     protect_cache: bool = True, flag: str = "--out") -> Path:
    """Validate a folder output before any work: usable name, not an input or cache, writable, replaceable."""
    path = _usable(out, flag)
    check_not_protected(path, inputs, protect_cache, flag)
    check_parent_writable(path, flag)
    if os.path.lexists(path):
        if not overwrite:
            raise SimdiffError(f"output {str(path)!r} already exists; pass --overwrite or choose another {flag}")
        check_replaceable(path, marker, flag)
    return path


def check_output_file(out: str | os.PathLike | None, overwrite: bool = False, inputs: Inputs = (),
                      suffixes: tuple[str, ...] | None = JSON_SUFFIXES, flag: str = "--json") -> Path:
    """Validate a single-file output (``--json``, ``--plot``) before any work; ``suffixes=None``: any name.

    A missing parent folder is created when the file is written (its nearest existing ancestor must be a
    writable folder).
    """
    path = _usable(out, flag)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise SimdiffError(f"{flag} {str(out)!r}: unknown extension {path.suffix or '(none)'!r}; "
                           f"use one of {', '.join(suffixes)}")
    check_not_protected(path, inputs, flag=flag)
    check_parent_writable(path, flag)
    if os.path.lexists(path):
        if path.is_dir():
            raise SimdiffError(f"{flag} {str(out)!r} is a folder; give a file name")
        if not overwrite:
            raise SimdiffError(f"{flag} {str(out)!r} already exists; pass --overwrite or choose another file")
    return path


# -- leftovers ------------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or not a pid of this system: keep
        return True
    return True


def _remove(path: Path) -> None:
    """Delete a file, a symlink (never its target) or a folder tree; a failure is a warning, not an error."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)
    except OSError as exc:
        log.warning("could not remove %s (%s); delete it by hand", path, exc)


def clean_leftovers(path: Path) -> None:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID`` beside ``path`` left by simdiff runs that are gone.

    A ``.NAME.old-PID`` with no ``NAME`` is the previous output of a run that died mid-replacement: it is
    renamed back instead of deleted.
    """
    prefix = f".{path.name}."
    if not path.parent.is_dir():
        return
    for entry in sorted(path.parent.iterdir()):
        match = _LEFTOVER.fullmatch(entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
        if match is None or _alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not os.path.lexists(path):
            os.rename(entry, path)
            log.warning("restored %s from %s (a run that was replacing it was killed)", path, entry.name)
            continue
        log.info("removing %s, left by simdiff process %s which is gone", entry, match["pid"])
        _remove(entry)


# -- failures at save -----------------------------------------------------------------------------------
def _disk_full(folder: Path) -> bool:
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < MIN_FREE_BYTES


def write_failure(exc: BaseException, target: Path) -> SimdiffError | None:
    """A one-line error for a failed write (disk full, read-only, no permission), or None for other errors."""
    if isinstance(exc, SimdiffError) or not isinstance(exc, Exception):
        return None
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        reason = exc.strerror or str(exc)
    elif "No space left on device" in str(exc) or _disk_full(target.parent):
        reason = "no space left on device"
    else:
        return None
    return SimdiffError(f"cannot write {str(target)!r}: {reason}; nothing was written (free space or choose "
                        "another location)")


@contextmanager
def _write_errors(target: Path) -> Iterator[None]:
    """Turn a failed write (disk full, read-only, no permission) into one :class:`SimdiffError` line."""
    try:
        yield
    except OSError as exc:
        failure = write_failure(exc, target)
        if failure is None:
            raise
        raise failure from exc


def _make_readable(path: Path) -> None:
    """mkdtemp/mkstemp create private entries; give the output the permissions of a normal mkdir/open."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path`` itself (a symlink is not followed), or None when nothing is there."""
    try:
        stat = os.lstat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


# -- claimed folders ------------------------------------------------------------------------------------
def _acquire_lock(lock: Path, target: Path, flag: str) -> int:
    """Take an exclusive flock on ``lock`` (created if missing) and write our pid into it."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(lock, target, flag) from None
        except OSError as exc:
            if exc.errno not in NO_FLOCK_ERRNOS:
                os.close(fd)
                raise
            return _acquire_pid_lock(fd, lock, target, flag)
        held = os.fstat(fd)
        if _identity(lock) == (held.st_dev, held.st_ino):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the lock file was removed by its previous holder while we waited: take the new one


def _holder(lock: Path) -> str:
    try:
        return lock.read_text(errors="replace").strip()
    except OSError:
        return ""


def _busy(lock: Path, target: Path, flag: str) -> SimdiffError:
    return SimdiffError(f"another simdiff run (pid {_holder(lock) or '?'}) is writing {str(target)!r}; wait for it "
                        f"to finish or choose another {flag}")


def _acquire_pid_lock(fd: int, lock: Path, target: Path, flag: str) -> int:
    """Fallback for file systems without flock (some NFS/Lustre mounts): the pid in the lock file decides."""
    holder = _holder(lock)
    if holder.isdigit() and _alive(int(holder)):
        os.close(fd)
        raise _busy(lock, target, flag)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class OutputDir:
    """A folder output claimed from the start of a command until it is released.

    Use as a context manager; :meth:`staging` yields the temporary folder to write into and commits it.
    """

    def __init__(self, out: str | os.PathLike, overwrite: bool = False, inputs: Inputs = (),
                 marker: str = MARKER, protect_cache: bool = True, flag: str = "--out") -> None:
        self.overwrite, self.marker, self.flag = overwrite, marker, flag
        self.path = check_output_dir(out, overwrite, inputs, marker, protect_cache, flag)
        self._lock = self.path.with_name(f".{self.path.name}{LOCK_SUFFIX}")
        with _write_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = _acquire_lock(self._lock, self.path, flag)
        try:
            clean_leftovers(self.path)
            check_output_dir(self.path, overwrite, inputs, marker, protect_cache, flag)  # after any restore
            self._claimed = _identity(self.path)
        except BaseException:
            self.release()
            raise
        fault_point("claimed")

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Give up the claim (removes the lock file)."""
        if self._fd is not None:
            self._lock.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """Yield an empty temporary sibling of the output; on success it replaces the output, else is deleted."""
        if self._fd is None:
            raise RuntimeError(f"the claim on {self.path} was released")
        with _write_errors(self.path):
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-{os.getpid()}-", dir=self.path.parent))
        try:
            _make_readable(tmp)
            yield tmp
            if self.marker and not (tmp / self.marker).is_file():
                raise RuntimeError(f"internal error: output {self.path} was written without its {self.marker}")
            fault_point("staged")
            self._commit(tmp)
        except BaseException as exc:
            failure = write_failure(exc, self.path)
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            if failure is not None:
                raise failure from exc
            raise

    def _commit(self, tmp: Path) -> None:
        """Rename ``tmp`` into place, if the output is still what it was when claimed."""
        if _identity(self.path) != self._claimed:
            raise SimdiffError(f"{str(self.path)!r} was created or changed by someone else while simdiff was "
                               "running; it was left untouched and this run's result discarded: rerun with "
                               f"another {self.flag}")
        if self._claimed is None:
            try:
                os.rename(tmp, self.path)  # fails when a non-empty folder or a file appeared just now
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise SimdiffError(f"{str(self.path)!r} appeared while simdiff was running; it was left "
                                       f"untouched and this run's result discarded: rerun with another "
                                       f"{self.flag}") from exc
                raise
            return
        check_replaceable(self.path, self.marker, self.flag)  # its content may have changed since the claim
        old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
        os.replace(self.path, old)
        fault_point("moved-aside")
        os.replace(tmp, self.path)
        fault_point("renamed-in")
        _remove(old)


def claim_output_dir(out: str | os.PathLike, overwrite: bool = False, inputs: Inputs = (), marker: str = MARKER,
                     protect_cache: bool = True, flag: str = "--out") -> OutputDir:
    """Validate and claim a folder output (see :class:`OutputDir`)."""
    return OutputDir(out, overwrite, inputs, marker, protect_cache, flag)


def claimed_dir(out: str | os.PathLike | OutputDir, overwrite: bool = False,
                inputs: Inputs = ()) -> AbstractContextManager[OutputDir]:
    """``out`` itself when the caller claimed it already (the caller releases it), else a new claim."""
    return nullcontext(out) if isinstance(out, OutputDir) else claim_output_dir(out, overwrite, inputs)


@contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False, inputs: Inputs = (), marker: str = MARKER,
                     protect_cache: bool = True) -> Iterator[Path]:
    """Claim ``out`` and yield its staging folder; readers never see a half-written ``out``."""
    with claim_output_dir(out, overwrite, inputs, marker, protect_cache) as claim, claim.staging() as tmp:
        yield tmp


# -- single files ---------------------------------------------------------------------------------------
@contextmanager
def atomic_file(out: str | os.PathLike, overwrite: bool = False, inputs: Inputs = (),
                suffixes: tuple[str, ...] | None = JSON_SUFFIXES, flag: str = "--json") -> Iterator[Path]:
    """Yield a temporary sibling of the file ``out`` (same extension); on success it is renamed into place.

    Without ``overwrite`` a file that appeared at ``out`` meanwhile is kept (a hard link never replaces).
    """
    path = check_output_file(out, overwrite, inputs, suffixes, flag)
    with _write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(path)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _make_readable(tmp)
        fault_point("file-staged")
        _place_file(tmp, path, overwrite, flag)
    except BaseException as exc:
        failure = write_failure(exc, path)
        tmp.unlink(missing_ok=True)
        if failure is not None:
            raise failure from exc
        raise


def _place_file(tmp: Path, path: Path, overwrite: bool, flag: str) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, and never replaces what exists
    except FileExistsError:
        raise SimdiffError(f"{flag} {str(path)!r} appeared while simdiff was running; it was left untouched: "
                           "rerun with another file or --overwrite") from None
    except OSError:  # a file system without hard links
        if os.path.lexists(path):
            raise SimdiffError(f"{flag} {str(path)!r} appeared while simdiff was running; it was left untouched") \
                from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def write_text_file(out: str | os.PathLike, text: str, overwrite: bool = False, inputs: Inputs = (),
                    flag: str = "--json") -> Path:
    """Write a JSON result file atomically under the output contract."""
    with atomic_file(out, overwrite, inputs, JSON_SUFFIXES, flag) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(out).expanduser()
