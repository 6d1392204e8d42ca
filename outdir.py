"""Files and output folders: atomic writes, JSON Lines, one writer a folder, a set replaced together.

Every file slm-ec writes goes through `write_atomic` (or `write_json`): the bytes go to a temporary
sibling, are fsynced and renamed over the target, so a reader (or a run killed mid-write) finds the
old file or the new one, never part of one. Every JSON Lines file is read through `read_jsonl`, which
names the file and line of a bad record (or, for logs a killed writer may have cut, skips it).

train.py and evaluate.py both write into an --out folder. Two processes writing one folder corrupt
it without a word (interleaved logs, an adapter from one run beside the config of the other), so
each holds a `FolderLock` for its whole run: `fcntl.flock` on a lock file in the folder. The kernel
drops the lock when the process dies, however it dies, so a killed run never leaves the folder
stuck; a second process is refused at once with one line naming the live one (pid, host, start).

`replace_together` puts several finished files into a folder so that a reader finds either the
whole new set or the whole old one: the files are written to a staging folder first, a journal
naming them is written (the commit point), then each is renamed into place. A process killed
during those renames leaves the journal, and the next `finish_pending` (called on the folder before
anything else) completes them.

The one rule for replacing and deleting (train.py, evaluate.py, export.py, predict.py): a script deletes or
replaces only what its own marker, read by content (`read_marker`), says it wrote; a name read from a file
inside a folder (a journal, a marker) must be a plain name in that folder (`plain_name`); a link is removed as
a link and never followed out of the folder (`remove_path`; lock files and logs are opened with O_NOFOLLOW).
A full disk is `DiskFull`: one line naming the file and the bytes it needed, the old file left as it was.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

STAGING = ".staging"
JOURNAL = ".replace-journal.json"


class FolderBusy(RuntimeError):
    """Another live process holds the folder's lock."""


class DiskFull(OSError):
    """No space left (or quota) writing a file: the message names the file and the bytes it needed."""

    def __str__(self) -> str:
        return self.strerror   # the sentence alone, without "[Errno 28]"


class NonFiniteError(ValueError):
    """A weight to be written holds NaN or inf, or a value beyond the range of the type it is written in: the
    writers (lora.io's exports, model.gguf's GGUF writer) refuse it before the file exists."""


def is_disk_full(error: BaseException) -> bool:
    """An OSError of a full disk or quota, or the RuntimeError/SafetensorError text torch and safetensors give it."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(error) or "unexpected pos" in str(error)


def disk_full(path: Path, needed: int | None) -> DiskFull:
    """The DiskFull error for `path`: what it needed and what the device has free."""
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        free = None
    size = lambda n: f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
    need = f"needs {size(needed)}" if needed is not None else "could not be written whole"
    has = f", {size(free)} free there" if free is not None else ""
    return DiskFull(errno.ENOSPC, f"no space left on the device to write {path} (it {need}{has})")


def plain_name(name, where: str) -> str:
    """`name` when it is a plain file name inside a folder (no path separator, not '.', '..' or empty);
    ValueError naming `where` otherwise (a name read from a file must not reach outside its folder)."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"{where}: {name!r} is not a plain file name inside the folder; refusing to act on it")
    return name


def remove_path(path: Path) -> None:
    """Delete a file, a link (the link itself, never what it points to) or a folder tree (links inside it
    removed as links); nothing when there is nothing."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def read_marker(path: Path, program: str) -> dict | None:
    """The marker at `path` when it is one `program` wrote: a regular file (not a link) holding a JSON object
    whose "written_by" is "slm-ec PROGRAM"; else None (a missing, linked, damaged or foreign file)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) and obj.get("written_by") == f"slm-ec {program}" else None


def open_append(path: Path):
    """A text file opened for appending without following a link at `path` (OSError ELOOP for a link)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, "a", encoding="utf-8")


def fsync_path(folder: Path) -> None:
    """fsync a file or a folder (a folder: making renames and new names in it durable), opened read-only."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, then the folder (before it is renamed into place)."""
    for path in sorted(Path(folder).rglob("*")) + [Path(folder)]:
        fsync_path(path)


def swap_in(tmp: Path, final: Path, old: Path) -> None:
    """Put the complete folder `tmp` at `final`. A `final` already there is renamed to `old` first (a link as a link:
    what it points to is never touched), put back if the second rename fails, and removed only once `tmp` is in
    place; a crash between the renames leaves it at `old`, whole, for the caller's clean-up to find."""
    remove_path(old)
    held = final.exists() or final.is_symlink()
    if held:
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if held and not (final.exists() or final.is_symlink()):
            os.rename(old, final)
        raise
    fsync_path(final.parent)
    remove_path(old)


def write_atomic(path: str | os.PathLike, content: bytes | str | Callable[[Path], None]) -> None:
    """Put a complete file at `path`: `content` (bytes, text as UTF-8, or a function that writes the file
    at the path it is given) goes to a temporary sibling, which is fsynced and renamed over `path`; then
    the folder is fsynced, so the new name survives a crash. On any failure the temporary file is removed
    and `path` is as it was."""
    path = Path(path)
    data = content.encode("utf-8", errors="backslashreplace") if isinstance(content, str) else content
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes it private; the file gets the usual mode
        fsync_path(tmp)                  # (an fsync of the file, opened read-only)
        os.replace(tmp, path)
    except BaseException as e:
        written = tmp.stat().st_size if tmp.is_file() else None
        tmp.unlink(missing_ok=True)
        if is_disk_full(e) and not isinstance(e, DiskFull):
            raise disk_full(path, len(data) if isinstance(data, bytes) else written) from None
        raise
    fsync_path(path.parent)


def write_json(path: str | os.PathLike, obj) -> None:
    """`obj` as indented JSON (non-JSON values as str), written atomically."""
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def parse_jsonl(text: str) -> Iterator[tuple[int, object]]:
    """(line number from 1, the value or a ValueError saying why the line is not one) for each non-blank
    line of JSON Lines text."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            yield number, ValueError(f"not valid JSON ({e.msg} at column {e.colno})")
        except RecursionError:
            yield number, ValueError("not valid JSON (nested too deeply to read)")


def read_jsonl(path: str | os.PathLike, *, skip_bad: bool = False, missing_ok: bool = False) -> list:
    """The values of a JSON Lines file. A line that is not JSON stops with ValueError("FILE line N: ..."),
    or with skip_bad=True (a log whose writer may have been killed mid-line) is left out. A missing file
    is [] with missing_ok=True, else FileNotFoundError."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        if not skip_bad:
            raise ValueError(f"{path}: not a UTF-8 text file, so not JSON Lines (byte {e.start}: {e.reason})") from None
        text = path.read_bytes().decode("utf-8", errors="replace")
    values = []
    for number, value in parse_jsonl(text):
        if isinstance(value, ValueError):
            if skip_bad:
                continue
            raise ValueError(f"{path} line {number}: {value}") from None
        values.append(value)
    return values


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, owned by someone else
        pass
    return True


class FolderLock:
    """An exclusive, non-blocking lock on `folder` (created if missing), held until `release()`.

    The lock file (`name` in the folder) holds who holds it: {"pid", "host", "started", "program"}.
    Use as a context manager, or call acquire() / release(). release() removes the lock file, and
    the folder too if this lock created it and nothing else was written there, so a run refused or
    failed before writing anything leaves nothing behind (a killed run leaves the file, unlocked).
    """

    def __init__(self, folder: str | os.PathLike, program: str, name: str = ".lock"):
        self.folder = Path(folder)
        self.program = program
        self.path = self.folder / name
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> "FolderLock":
        if not self.folder.is_dir():
            if self.folder.exists():
                raise FileExistsError(f"{self.folder} exists and is not a folder")
            self.folder.mkdir(parents=True, exist_ok=True)
            self.created = True
        for _ in range(10):   # the lock file may be removed between our open and our lock: try again
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            except FileNotFoundError:   # the folder was removed by a run that failed just now
                self.folder.mkdir(parents=True, exist_ok=True)
                self.created = True
                continue
            except OSError as e:
                if e.errno == errno.ELOOP:   # a link planted where the lock file goes: never write through it
                    raise FolderBusy(f"{self.path} is a link, not a lock file; refusing to write through it "
                                     "(remove the link, or pass another --out)") from None
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise FolderBusy(f"{self.folder} is in use by {self.holder()}: wait for it to end, or pass "
                                     "another --out") from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise FolderBusy(f"{self.folder}: could not take the lock file {self.path.name} (it keeps being replaced)")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "program": self.program,
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def holder(self) -> str:
        """Who holds the lock: 'a live train.py (pid 123 on host h, started 2025-01-01T12:00:00+00:00)'."""
        for _ in range(20):   # the holder writes its details just after taking the lock: until then the
            try:              # file is empty, or still names a killed holder before it
                info = json.loads(self.path.read_text())
                if info["host"] != socket.gethostname() or _alive(info["pid"]):
                    return (f"a live {info['program']} (pid {info['pid']} on host {info['host']}, "
                            f"started {info['started']})")
            except (OSError, ValueError, KeyError, TypeError):
                pass
            time.sleep(0.05)
        return f"another live process (its {self.path.name} does not say which)"

    def release(self) -> None:
        """Remove the lock file (a process that opened it meanwhile sees the inode change and retries),
        and the folder if this lock created it and it is empty; then drop the lock."""
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
            if self.created and not any(self.folder.iterdir()):
                self.folder.rmdir()
        except OSError:
            pass
        os.close(self.fd)   # closing the descriptor drops the lock
        self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def staging_folder(folder: Path) -> Path:
    """An empty staging folder inside `folder` for files that replace_together will put in place."""
    staged = folder / STAGING
    remove_path(staged)
    staged.mkdir(parents=True)
    return staged


def replace_together(folder: Path, names: list[str], remove: tuple[str, ...] = ()) -> None:
    """Move the staged files `names` (in folder/.staging) over folder/<name>, and delete the files
    `remove` (old outputs the new set does not include), all or nothing as seen after finish_pending.
    """
    staged = folder / STAGING
    for name in names:
        fd = os.open(staged / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_path(staged)
    journal = {"move": list(names), "remove": [r for r in remove if r not in names]}
    write_atomic(folder / JOURNAL, json.dumps(journal))   # the commit point
    finish_pending(folder)


def read_journal(path: Path, allowed: tuple[str, ...] | None) -> dict:
    """The journal {"move": [names], "remove": [names]} at `path`, each name a plain name (and one of `allowed`
    when given); ValueError naming the file otherwise."""
    try:
        journal = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not a replacement journal (not JSON: {e}); delete it if no replacement is "
                         "pending") from None
    if not (isinstance(journal, dict) and isinstance(journal.get("move"), list)
            and isinstance(journal.get("remove"), list)):
        raise ValueError(f"{path}: not a replacement journal (expected {{\"move\": [names], \"remove\": [names]}})")
    for name in journal["move"] + journal["remove"]:
        plain_name(name, str(path))
        if allowed is not None and name not in allowed:
            raise ValueError(f"{path}: names {name!r}, which is not one of the files this folder's outputs are "
                             f"({', '.join(allowed)}); refusing to act on it")
    return journal


def finish_pending(folder: Path, allowed: tuple[str, ...] | None = None) -> bool:
    """Complete a replace_together that a killed process left half done; drop an uncommitted staging
    folder. True when there was something to complete. The journal's names must be plain names (and among
    `allowed`, the outputs of the caller, when given): a journal planted to move or delete other files is
    refused (ValueError)."""
    folder = Path(folder)
    journal_path = folder / JOURNAL
    staged = folder / STAGING
    for torn in folder.glob(f".{JOURNAL}.*.tmp"):   # a journal write_atomic never renamed into place
        torn.unlink(missing_ok=True)
    if not journal_path.is_file():
        remove_path(staged)   # written but never committed: the old set stands
        return False
    journal = read_journal(journal_path, allowed)
    for name in journal["move"]:
        if (staged / name).exists():
            os.replace(staged / name, folder / name)
    for name in journal["remove"]:
        remove_path(folder / name)
    fsync_path(folder)
    journal_path.unlink()
    remove_path(staged)
    fsync_path(folder)
    return True
