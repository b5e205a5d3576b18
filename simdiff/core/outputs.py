"""The output contract: every file and folder simdiff writes goes through this module.

- **Validate at start**: every output path is checked before any model work (not empty, ``.``, ``/`` or a
  folder holding the current or home folder; a known extension for files, never named ``simdiff.json``; a
  writable parent).
- **Claim at start**: a folder output is claimed by a lock file beside it (``.NAME.simdiff-lock``, an
  ``flock``; it holds our pid and host), so a second run to the same path fails at once with one line.
- **Replace only what is ours**: every folder output's ``simdiff.json`` records the files written into it
  (:data:`MANIFEST_KEY`); ``overwrite`` replaces a folder only when it is empty or holds exactly such recorded
  files (nothing else, no recorded file resized), and a file only when it is a regular file; never anything
  that is, contains or lies inside an input model or the model caches.
- **Atomic commit**: the result is written into ``.NAME.tmp-HOST-PID-*`` beside the target and renamed into
  place at the end. A folder or file that appeared at the target during the run is detected and kept
  untouched. Files added after the commit (a GGUF export, an evaluation) are staged beside the folder,
  recorded, then linked in, still under the claim (:meth:`OutputDir.add_file`).
- **Leftovers**: ``.NAME.tmp-HOST-PID-*`` / ``.NAME.old-HOST-PID`` of a process of this host that is gone
  (killed) are removed by the next run to the same path; a ``.NAME.old-*`` whose target is missing is renamed
  back (it is the previous output, and the run that was replacing it died before renaming the new one in).
  Another host's entries and lock are never touched.
- **Failures at save** (full disk, read-only or unwritable folder) become one :class:`SimdiffError` line and
  leave nothing behind; a failed extra file after a saved output is :class:`PartialOutputError` (exit 3).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from simdiff.core.errors import PartialOutputError, SimdiffError, one_line

log = logging.getLogger(__name__)

MARKER = "simdiff.json"  # every folder simdiff writes holds it; --overwrite replaces only such folders
LOCK_SUFFIX = ".simdiff-lock"
JSON_SUFFIXES = (".json",)
PLOT_SUFFIXES = (".png", ".svg", ".pdf")
FAULT_ENV = "SIMDIFF_FAULT_AT"  # tests only: kill the process with SIGKILL at the named step of a save
NO_FLOCK_ERRNOS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
MIN_FREE_BYTES = 1 << 20
MANIFEST_KEY = "simdiff_output"  # in the marker: {"schema": MANIFEST_SCHEMA, "files": {relative path: bytes}}
MANIFEST_SCHEMA = "simdiff-output/1"
# leftovers: .NAME.tmp-HOST-PID-*, .NAME.old-HOST-PID (HOST: _host_token, always holds a letter or "_");
# names without a host (.NAME.tmp-PID-*, .NAME.old-PID) were written before hosts were recorded
_LEFTOVER = re.compile(r"(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9._]*[A-Za-z_][A-Za-z0-9._]*)-(?P<pid>\d+)(?:-.*)?")
_OLD_LEFTOVER = re.compile(r"(?P<kind>tmp|old)-(?P<pid>\d+)(?:-.*)?")

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


def check_replaceable(path: Path, marker: str = MARKER, flag: str = "--out", manifest: bool | None = None) -> None:
    """``--overwrite`` replaces an empty folder, or a previous simdiff output: one holding ``marker``.

    With ``manifest`` (the default for ``simdiff.json``) the marker must also hold simdiff's record of the files
    it wrote, and the folder nothing else: no other entry, no recorded file of another size.
    """
    if not path.is_dir():
        raise SimdiffError(f"output {str(path)!r} exists and is not a directory")
    if not any(path.iterdir()):
        return
    if not (path / marker).is_file():
        raise SimdiffError(f"{flag} {str(path)!r} is not a simdiff output (no {marker}) and not empty; "
                           "--overwrite replaces only earlier simdiff outputs: move it away or choose another path")
    if not (marker == MARKER if manifest is None else manifest):
        return
    recorded = read_manifest(path / marker)
    if recorded is None:
        raise SimdiffError(f"{flag} {str(path)!r} holds a {marker} without simdiff's record of the files it wrote "
                           "(written by a simdiff version before that record, or not by simdiff), so --overwrite "
                           "cannot tell what else the folder holds: check it and delete it yourself, or choose "
                           f"another {flag}")
    surprise = unexpected_entry(path, recorded, marker)
    if surprise is not None:
        raise SimdiffError(f"{flag} {str(path)!r} holds {surprise}, which simdiff did not write there (not as "
                           f"recorded in its {marker}); --overwrite replaces only exactly what simdiff wrote: move "
                           f"that away or choose another {flag}")


def read_manifest(marker_file: Path) -> dict[str, int] | None:
    """The files (relative path -> bytes) recorded in an output's marker, or None without a valid record."""
    try:
        document = json.loads(marker_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    record = document.get(MANIFEST_KEY) if isinstance(document, dict) else None
    if not isinstance(record, dict) or record.get("schema") != MANIFEST_SCHEMA:
        return None
    files = record.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in files.values()):
        return None
    return files


def unexpected_entry(folder: Path, recorded: dict[str, int], marker: str) -> str | None:
    """The first entry under ``folder`` that is not a file ``recorded`` (with its size) or a folder holding one."""
    folders = {str(parent) for name in recorded for parent in Path(name).parents if str(parent) != "."}
    unreadable: list[OSError] = []
    for root, dirs, files in os.walk(folder, onerror=unreadable.append):
        if unreadable:
            break
        base = Path(root).relative_to(folder)
        for name in sorted(dirs + files):
            entry = base / name
            relative, stat = entry.as_posix(), os.lstat(folder / entry)
            if os.path.isdir(folder / entry) and not os.path.islink(folder / entry):
                if relative not in folders:
                    return f"the folder {relative!r}"
            elif not os.path.isfile(folder / entry) or os.path.islink(folder / entry):
                return f"{relative!r} (not a regular file)"
            elif relative == marker:
                continue
            elif relative not in recorded:
                return repr(relative)
            elif recorded[relative] != stat.st_size:
                return (f"{relative!r} changed since simdiff wrote it ({stat.st_size} bytes, recorded "
                        f"{recorded[relative]})")
    if unreadable:
        where = Path(unreadable[0].filename or folder)
        return f"{where.relative_to(folder).as_posix() if where != folder else '.'!r}, which cannot be read"
    return None


def files_written(folder: Path, marker: str = MARKER) -> dict[str, int]:
    """Every regular file under ``folder`` but the marker: relative path -> size in bytes."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            if relative != marker and path.is_file() and not path.is_symlink():
                found[relative] = path.stat().st_size
    return dict(sorted(found.items()))


def write_manifest(folder: Path, marker: str = MARKER, files: dict[str, int] | None = None,
                   target: Path | None = None) -> None:
    """Record ``files`` (default: what ``folder`` holds) in ``folder``'s marker; written to ``target`` if given."""
    marker_file = folder / marker
    document = json.loads(marker_file.read_text(encoding="utf-8"))
    if not isinstance(document, dict):
        raise RuntimeError(f"internal error: {marker_file} is not a JSON object")
    document[MANIFEST_KEY] = {"schema": MANIFEST_SCHEMA,
                              "files": files_written(folder, marker) if files is None else files}
    (target or marker_file).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def check_output_dir(out: str | os.PathLike, overwrite: bool = False, inputs: Inputs = (), marker: str = MARKER,
                     protect_cache: bool = True, flag: str = "--out", manifest: bool | None = None) -> Path:
    """Validate a folder output before any work: usable name, not an input or cache, writable, replaceable."""
    path = _usable(out, flag)
    check_not_protected(path, inputs, protect_cache, flag)
    check_parent_writable(path, flag)
    if os.path.lexists(path):
        if not overwrite:
            raise SimdiffError(f"output {str(path)!r} already exists; pass --overwrite or choose another {flag}")
        check_replaceable(path, marker, flag, manifest)
    return path


def check_output_file(out: str | os.PathLike | None, overwrite: bool = False, inputs: Inputs = (),
                      suffixes: tuple[str, ...] | None = JSON_SUFFIXES, flag: str = "--json") -> Path:
    """Validate a single-file output (``--json``, ``--plot``) before any work; ``suffixes=None``: any name.

    A missing parent folder is created when the file is written (its nearest existing ancestor must be a
    writable folder).
    """
    path = _usable(out, flag)
    if path.name.lower() == MARKER:
        raise SimdiffError(f"{flag} {str(out)!r}: the name {MARKER} is reserved for the record simdiff keeps in "
                           "its output folders; choose another file name")
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
def host_name() -> str:
    """This machine's name, as recorded in lock files and leftover names."""
    return socket.gethostname() or "unknown-host"


def _host_token(host: str) -> str:
    """``host`` as it appears in leftover names: no ``-`` (it separates host and pid), never only digits."""
    token = re.sub(r"[^A-Za-z0-9.]", "_", host)
    return token if re.search(r"[A-Za-z_]", token) else f"h_{token}"


def _ours() -> str:
    """``HOST-PID``: what this process puts into the names of its temporary entries."""
    return f"{_host_token(host_name())}-{os.getpid()}"


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


def _leftover(name: str) -> tuple[str, str | None, int] | None:
    """(kind, host token or None for names written before hosts were recorded, pid) of a leftover suffix."""
    match = _LEFTOVER.fullmatch(name)
    if match is not None:
        return match["kind"], match["host"], int(match["pid"])
    match = _OLD_LEFTOVER.fullmatch(name)
    return None if match is None else (match["kind"], None, int(match["pid"]))


def clean_leftovers(path: Path) -> None:
    """Remove ``.NAME.tmp-HOST-PID-*`` / ``.NAME.old-HOST-PID`` beside ``path`` left by runs on this host that are gone.

    A ``.NAME.old-HOST-PID`` with no ``NAME`` is the previous output of a run that died mid-replacement: it is
    renamed back instead of deleted. Another host's entries are never touched (its processes cannot be seen
    from here); entries without a host (older simdiff versions) are only ever renamed back, never deleted.
    """
    prefix = f".{path.name}."
    if not path.parent.is_dir():
        return
    here = _host_token(host_name())
    for entry in sorted(path.parent.iterdir()):
        found = _leftover(entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
        if found is None:
            continue
        kind, host, pid = found
        if host is not None and host != here:
            log.warning("keeping %s: it belongs to simdiff process %d on host %s, whose state cannot be seen from "
                        "here; delete it by hand once that run is gone", entry, pid, host)
            continue
        if _alive(pid):
            continue
        if kind == "old" and not os.path.lexists(path):
            os.rename(entry, path)
            log.warning("restored %s from %s (a run that was replacing it was killed)", path, entry.name)
            continue
        if host is None:
            log.warning("keeping %s: written by an older simdiff that did not record its host; delete it by hand "
                        "if no simdiff run on another machine is writing %s", entry, path)
            continue
        log.info("removing %s, left by simdiff process %d which is gone", entry, pid)
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
def _lock_content() -> bytes:
    return f"{os.getpid()} {host_name()}\n".encode()


def _acquire_lock(lock: Path, target: Path, flag: str) -> int:
    """Take an exclusive flock on ``lock`` (created if missing) and write our pid and host into it."""
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
            os.pwrite(fd, _lock_content(), 0)
            return fd
        os.close(fd)  # the lock file was removed by its previous holder while we waited: take the new one


def _holder(lock: Path) -> tuple[str, str | None]:
    """(pid text, host or None) written in ``lock``; an older simdiff wrote the pid alone."""
    try:
        words = lock.read_text(errors="replace").split()
    except OSError:
        words = []
    return (words[0] if words else ""), (" ".join(words[1:]) or None)


def _busy(lock: Path, target: Path, flag: str) -> SimdiffError:
    pid, host = _holder(lock)
    where = "" if host in (None, host_name()) else f" on host {host}"
    return SimdiffError(f"another simdiff run (pid {pid or '?'}{where}) is writing {str(target)!r}; wait for it "
                        f"to finish or choose another {flag}")


def _acquire_pid_lock(fd: int, lock: Path, target: Path, flag: str) -> int:
    """Fallback for file systems without flock (some NFS/Lustre mounts): the pid and host in the lock file decide.

    Liveness is checked for this host's processes only; a lock of another host (or of an older simdiff, which
    did not record its host) is never taken over.
    """
    pid, host = _holder(lock)
    if pid.isdigit() and host != host_name():
        os.close(fd)
        who = f"host {host}" if host else "an unknown host (an older simdiff)"
        raise SimdiffError(f"{flag} {str(target)!r} is locked by simdiff process {pid} on {who}, and this file "
                           "system has no flock to tell whether it still runs; if no simdiff run is writing there "
                           f"any more, delete the stale lock {str(lock)!r} and rerun")
    if pid.isdigit() and _alive(int(pid)):
        os.close(fd)
        raise _busy(lock, target, flag)
    os.ftruncate(fd, 0)
    os.pwrite(fd, _lock_content(), 0)
    return fd


class OutputDir:
    """A folder output claimed from the start of a command until it is released.

    Use as a context manager; :meth:`staging` yields the temporary folder to write into and commits it.
    """

    def __init__(self, out: str | os.PathLike, overwrite: bool = False, inputs: Inputs = (),
                 marker: str = MARKER, protect_cache: bool = True, flag: str = "--out",
                 manifest: bool | None = None) -> None:
        self.overwrite, self.marker, self.flag = overwrite, marker, flag
        self.manifest = marker == MARKER if manifest is None else manifest  # record the files in the marker
        self.committed = False
        self.path = check_output_dir(out, overwrite, inputs, marker, protect_cache, flag, self.manifest)
        self._lock = self.path.with_name(f".{self.path.name}{LOCK_SUFFIX}")
        with _write_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = _acquire_lock(self._lock, self.path, flag)
        try:
            clean_leftovers(self.path)
            check_output_dir(self.path, overwrite, inputs, marker, protect_cache, flag, self.manifest)  # after restore
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
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-{_ours()}-", dir=self.path.parent))
        try:
            _make_readable(tmp)
            yield tmp
            if self.marker and not (tmp / self.marker).is_file():
                raise RuntimeError(f"internal error: output {self.path} was written without its {self.marker}")
            if self.manifest:
                write_manifest(tmp, self.marker)
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
            self._committed_as(self.path)
            return
        check_replaceable(self.path, self.marker, self.flag, self.manifest)  # it may have changed since the claim
        old = self.path.with_name(f".{self.path.name}.old-{_ours()}")
        os.replace(self.path, old)
        fault_point("moved-aside")
        os.replace(tmp, self.path)
        fault_point("renamed-in")
        self._committed_as(self.path)
        _remove(old)

    def _committed_as(self, path: Path) -> None:
        self.committed, self._claimed = True, _identity(path)

    def add_file(self, name: str, write: Callable[[Path], None]) -> Path:
        """After the commit, still under the claim: put one more file ``name`` into the output atomically.

        ``write(path)`` writes it to a temporary sibling of the output (``.NAME.tmp-HOST-PID-*``); it is
        recorded in the marker, then linked into place. A failure leaves the committed output as it was.
        """
        if self._fd is None or not self.committed:
            raise RuntimeError(f"internal error: {name} added to {self.path} outside its claim or before its commit")
        target = self.path / name
        with _write_errors(target):
            fd, staged = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-{_ours()}-", suffix=f"-{name}",
                                          dir=self.path.parent)
        os.close(fd)
        tmp = Path(staged)
        try:
            write(tmp)
            _make_readable(tmp)
            if _identity(self.path) != self._claimed or os.path.lexists(target):
                raise SimdiffError(f"{str(self.path)!r} was changed by someone else after simdiff wrote it; "
                                   f"{name} was not added")
            if self.manifest:
                self._record(name, tmp.stat().st_size)
            fault_point("extra-recorded")
            _place_file(tmp, target, False, self.flag)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            failure = write_failure(exc, target)
            if failure is not None:
                raise failure from exc
            raise
        return target

    def _record(self, name: str, size: int) -> None:
        """Add ``name`` to the files recorded in the marker (the marker is replaced atomically)."""
        files = {**(read_manifest(self.path / self.marker) or {}), name: size}
        fd, staged = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-{_ours()}-", suffix=f"-{self.marker}",
                                      dir=self.path.parent)
        os.close(fd)
        try:
            write_manifest(self.path, self.marker, dict(sorted(files.items())), target=Path(staged))
            _make_readable(Path(staged))
            os.replace(staged, self.path / self.marker)
        finally:
            Path(staged).unlink(missing_ok=True)


Extra = tuple[str, Callable[[Path], None]]  # (file name, function writing it to the path it is given)


def add_extras(claim: OutputDir, extras: Iterable[Extra], saved: str = "the model") -> list[Path]:
    """Add each extra file to the committed output (:meth:`OutputDir.add_file`), all attempted.

    When any fails, :class:`PartialOutputError` (exit 3) says what is in the output and what is not; the output
    itself stays complete.
    """
    written, failed = [], []
    for name, write in extras:
        try:
            written.append(claim.add_file(name, write))
        except Exception as exc:  # noqa: BLE001 - reported below, with what was saved
            log.debug("writing %s failed", name, exc_info=True)
            failed.append(f"{name} ({one_line(str(exc)) or type(exc).__name__})")
    if failed:
        also = "".join(f", {p.name}" for p in written)
        raise PartialOutputError(f"saved {str(claim.path)!r} ({saved}, complete{also}), but NOT written: "
                                 f"{'; '.join(failed)}; the saved output is usable as it is (exit status 3: saved, "
                                 "an extra file failed)")
    return written


def claim_output_dir(out: str | os.PathLike, overwrite: bool = False, inputs: Inputs = (), marker: str = MARKER,
                     protect_cache: bool = True, flag: str = "--out", manifest: bool | None = None) -> OutputDir:
    """Validate and claim a folder output (see :class:`OutputDir`)."""
    return OutputDir(out, overwrite, inputs, marker, protect_cache, flag, manifest)


def claimed_dir(out: str | os.PathLike | OutputDir, overwrite: bool = False,
                inputs: Inputs = ()) -> AbstractContextManager[OutputDir]:
    """``out`` itself when the caller claimed it already (the caller releases it), else a new claim."""
    return nullcontext(out) if isinstance(out, OutputDir) else claim_output_dir(out, overwrite, inputs)


@contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False, inputs: Inputs = (), marker: str = MARKER,
                     protect_cache: bool = True, manifest: bool | None = None) -> Iterator[Path]:
    """Claim ``out`` and yield its staging folder; readers never see a half-written ``out``."""
    with claim_output_dir(out, overwrite, inputs, marker, protect_cache, manifest=manifest) as claim, \
            claim.staging() as tmp:
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
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{_ours()}-", suffix=path.suffix, dir=path.parent)
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


@contextmanager
def scratch_folder(beside: Path) -> Iterator[Path]:
    """A private temporary folder beside ``beside`` (a leftover name of this host and pid), removed at the end."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{beside.name}.tmp-{_ours()}-", dir=beside.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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
