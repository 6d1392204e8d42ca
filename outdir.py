"""Output folders: one writer at a time, and a set of files replaced together.

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
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

STAGING = ".staging"
JOURNAL = ".replace-journal.json"


class FolderBusy(RuntimeError):
    """Another live process holds the folder's lock."""


def fsync_dir(folder: Path) -> None:
    """fsync a folder (making renames and new names in it durable) or a file, opened read-only."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:   # the folder was removed by a run that failed just now
                self.folder.mkdir(parents=True, exist_ok=True)
                self.created = True
                continue
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


def write_bytes_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def staging_folder(folder: Path) -> Path:
    """An empty staging folder inside `folder` for files that replace_together will put in place."""
    staged = folder / STAGING
    if staged.exists():
        shutil.rmtree(staged)
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
    fsync_dir(staged)
    journal = {"move": list(names), "remove": [r for r in remove if r not in names]}
    tmp = folder / (JOURNAL + ".tmp")
    write_bytes_durably(tmp, json.dumps(journal).encode())
    os.replace(tmp, folder / JOURNAL)   # the commit point
    fsync_dir(folder)
    finish_pending(folder)


def finish_pending(folder: Path) -> bool:
    """Complete a replace_together that a killed process left half done; drop an uncommitted staging
    folder. True when there was something to complete."""
    folder = Path(folder)
    journal_path = folder / JOURNAL
    staged = folder / STAGING
    (folder / (JOURNAL + ".tmp")).unlink(missing_ok=True)
    if not journal_path.is_file():
        if staged.exists():
            shutil.rmtree(staged)   # written but never committed: the old set stands
        return False
    journal = json.loads(journal_path.read_text())
    for name in journal["move"]:
        if (staged / name).exists():
            os.replace(staged / name, folder / name)
    for name in journal["remove"]:
        (folder / name).unlink(missing_ok=True)
    fsync_dir(folder)
    journal_path.unlink()
    shutil.rmtree(staged, ignore_errors=True)
    fsync_dir(folder)
    return True
