"""One writer per project: ``<name>.lock`` beside ``<name>.h5ad``.

A process that opens a project for writing (napari, :meth:`~.review.Review.open`,
``hemofm umap``) first creates ``<name>.lock`` with ``O_CREAT | O_EXCL`` (atomic on
local and NFSv3+ file systems) and writes its holder into it as JSON: ``user``,
``host``, ``pid``, ``time`` (UTC, ISO 8601), the process start time when known and a
random ``token``. Another process then gets :class:`ProjectLockedError` naming the
holder, and may open the project read-only instead.

A lock whose holder is dead is taken over: same host and the pid no longer runs (or
runs a different process, told by its start time). A lock from another host is never
taken over automatically, since its process cannot be checked from here; the message
says so. The lock is released by :meth:`ProjectLock.release` (closing the project),
and at interpreter exit by an ``atexit`` hook; a process killed outright leaves its
lock behind, and the next opener takes it over as stale.

Within one process the lock is re-entrant: tables opened from one project in the same
process share it (counted), because the lock protects against *other processes*; the
file is removed when the last holder releases it.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "LOCK_SUFFIX",
    "LockInfo",
    "ProjectLock",
    "ProjectLockedError",
    "lock_path",
    "pid_alive",
    "read_lock",
]

LOCK_SUFFIX = ".lock"

#: A lock file still empty or half-written after this many seconds is broken (its
#: creator died between creating and writing it) and is taken over.
PARTIAL_LOCK_GRACE_S = 10.0

TAKEOVER_TRIES = 200
TAKEOVER_POLL_S = 0.01


class ProjectLockedError(RuntimeError):
    """Another process holds the project's lock; ``holder`` says who (or None).

    Open the project read-only (``read_only=True`` / ``mode="r"``), wait for the
    holder to close it, or, if that process is gone, delete the ``.lock`` file.
    """

    def __init__(self, message: str, holder: LockInfo | None = None) -> None:
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class LockInfo:
    """Who holds a project lock (the JSON in ``<name>.lock``)."""

    user: str
    host: str
    pid: int
    time: str
    started: float | None = None
    token: str = ""

    def describe(self) -> str:
        """``user@host (pid N) since TIME``."""
        return f"{self.user}@{self.host} (pid {self.pid}) since {self.time}"

    def to_json(self) -> str:
        """The lock file's content (one JSON object)."""
        data: dict[str, Any] = {
            "user": self.user,
            "host": self.host,
            "pid": self.pid,
            "time": self.time,
            "token": self.token,
        }
        if self.started is not None:
            data["started"] = self.started
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> LockInfo:
        """Parse a lock file's content; ``ValueError`` when it is not a lock record."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        try:
            started = data.get("started")
            return cls(
                user=str(data["user"]),
                host=str(data["host"]),
                pid=int(data["pid"]),
                time=str(data["time"]),
                started=None if started is None else float(started),
                token=str(data.get("token", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a lock record ({exc})") from exc


def lock_path(project: str | Path) -> Path:
    """``<name>.lock`` beside the project file ``<name>.h5ad``.

    Symbolic links are resolved first, so two processes that open one project through
    different names (a link and its target) meet at the same lock, beside the real file.
    """
    project = Path(os.path.realpath(Path(project).expanduser()))
    stem = project.name[: -len(".h5ad")] if project.name.endswith(".h5ad") else project.name
    return project.with_name(stem + LOCK_SUFFIX)


def _user() -> str:
    from napari_hemofm.core.journal import current_user

    return current_user()


def _host() -> str:
    return socket.gethostname() or "localhost"


def _process_start(pid: int) -> float | None:
    """Start time of process ``pid`` (seconds since the epoch), or None when unknown."""
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # no psutil, no such process, or no permission
        return None


def pid_alive(pid: int, started: float | None = None) -> bool:
    """Whether process ``pid`` on this host runs (and, given ``started``, is that process).

    Parameters
    ----------
    pid : int
    started : float, optional
        The process's start time when the lock was taken; a running process with
        another start time is a new process that reused the pid.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    except OSError:
        return False
    if started is not None:
        now = _process_start(pid)
        if now is not None and abs(now - started) > 1.0:
            return False
    return True


def read_lock(project: str | Path) -> LockInfo | None:
    """The holder of the project's lock, or None when it is not locked (or unreadable)."""
    try:
        text = lock_path(project).read_text(encoding="utf-8")
        return LockInfo.from_json(text)
    except (OSError, ValueError):
        return None


def _is_stale(info: LockInfo) -> bool:
    return info.host == _host() and not pid_alive(info.pid, info.started)


# one entry per project locked by this process: [ProjectLock, count]
_HELD: dict[str, list[Any]] = {}
_HELD_LOCK = threading.Lock()


class ProjectLock:
    """The write lock of one project file, held by this process.

    Parameters
    ----------
    project : str or Path
        The ``.h5ad`` file (it need not exist yet).

    Notes
    -----
    Use :meth:`acquire` (re-entrant within the process, counted) and :meth:`release`
    once per acquire; the lock file disappears with the last release or at exit.
    """

    def __init__(self, project: str | Path) -> None:
        self.project = Path(os.path.abspath(project))
        self.path = lock_path(self.project)
        self.info: LockInfo | None = None

    @property
    def _key(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------ acquiring
    @classmethod
    def acquire(cls, project: str | Path, *, wait: float = 0.0, poll: float = 0.2) -> ProjectLock:
        """Take the project's lock (or share this process's hold on it).

        Parameters
        ----------
        project : str or Path
            The project file.
        wait : float
            Seconds to keep trying while another live process holds it (0: fail at once).
        poll : float
            Seconds between tries while waiting.

        Returns
        -------
        ProjectLock

        Raises
        ------
        ProjectLockedError
            When another process still holds it after ``wait`` seconds.
        OSError
            When the lock file cannot be created (e.g. a read-only folder).
        """
        lock = cls(project)
        with _HELD_LOCK:
            held = _HELD.get(lock._key)
            if held is not None:
                held[1] += 1
                return held[0]
        deadline = time.monotonic() + max(0.0, float(wait))
        while True:
            holder = lock._try_create()
            if holder is None:
                with _HELD_LOCK:
                    _HELD[lock._key] = [lock, 1]
                return lock
            if time.monotonic() >= deadline:
                raise ProjectLockedError(_locked_message(lock.project, holder), holder)
            time.sleep(poll)

    def _try_create(self) -> LockInfo | None:
        """Create the lock file; None on success, else its live holder."""
        for _ in range(TAKEOVER_TRIES):
            pid = os.getpid()
            info = LockInfo(
                user=_user(),
                host=_host(),
                pid=pid,
                time=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                started=_process_start(pid),
                token=secrets.token_hex(8),
            )
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder_or_stale()
                if holder is not None:
                    return holder
                continue  # a stale lock was removed (or is being removed): try again
            try:
                # no fsync: after a power cut the holder is gone anyway, and an empty or
                # half-written lock older than PARTIAL_LOCK_GRACE_S is taken over
                os.write(fd, info.to_json().encode("utf-8"))
            finally:
                os.close(fd)
            self.info = info
            return None
        return read_lock(self.project) or LockInfo("?", "?", -1, "(being taken over)")

    def _holder_or_stale(self) -> LockInfo | None:
        """The live holder of an existing lock file, or None once a stale one is gone."""
        try:
            text = self.path.read_text(encoding="utf-8")
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None  # released meanwhile
        try:
            holder = LockInfo.from_json(text)
        except ValueError:
            if time.time() - mtime < PARTIAL_LOCK_GRACE_S:
                # being written right now by its creator
                return LockInfo("?", "?", -1, "(being created)")
            self._remove_stale(text)
            return None
        if not _is_stale(holder):
            return holder
        self._remove_stale(text)
        return None

    def _remove_stale(self, text: str) -> None:
        """Remove a stale lock file whose content is ``text``, one taker at a time.

        Two processes finding the same stale lock must not remove each other's fresh
        one: a taker first creates ``<name>.lock.takeover`` (``O_EXCL``), checks that the
        lock still holds the stale content, removes it, and removes the guard. A taker
        finding the guard waits a moment and looks again; a guard older than
        :data:`PARTIAL_LOCK_GRACE_S` (its taker died) is removed.
        """
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - guard.stat().st_mtime > PARTIAL_LOCK_GRACE_S:
                    guard.unlink()
            time.sleep(TAKEOVER_POLL_S)
            return
        os.close(fd)
        try:
            with contextlib.suppress(FileNotFoundError):
                if self.path.read_text(encoding="utf-8") == text:
                    self.path.unlink()
        finally:
            with contextlib.suppress(FileNotFoundError):
                guard.unlink()

    # ------------------------------------------------------------ releasing
    @property
    def held(self) -> bool:
        """Whether this process holds the lock (through this or another handle)."""
        with _HELD_LOCK:
            return self._key in _HELD

    def release(self) -> None:
        """Give one hold back; the last one removes the lock file (if it is still ours)."""
        with _HELD_LOCK:
            held = _HELD.get(self._key)
            if held is None:
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del _HELD[self._key]
            owner = held[0]
        owner._remove_file()

    def _remove_file(self) -> None:
        if self.info is None:
            return
        try:
            current = LockInfo.from_json(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if current.token == self.info.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> ProjectLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"ProjectLock({str(self.project)!r}, held={self.held})"


def _locked_message(project: Path, holder: LockInfo) -> str:
    text = f"{project.name} is open for writing by {holder.describe()}"
    if holder.host != _host() and holder.host != "?":
        text += f"; if that process on {holder.host} is gone, delete {lock_path(project).name}"
    return text + "; open it read-only or try again when it is closed"


def locked_message(project: str | Path) -> str | None:
    """One line naming who holds ``project`` when another live process does, else None."""
    holder = read_lock(project)
    if holder is None or _is_stale(holder):
        return None
    if holder.host == _host() and holder.pid == os.getpid():
        return None
    return _locked_message(Path(project), holder)


@atexit.register
def _release_all() -> None:
    with _HELD_LOCK:
        owners = [held[0] for held in _HELD.values()]
        _HELD.clear()
    for owner in owners:
        with contextlib.suppress(Exception):
            owner._remove_file()


def _forget_in_child() -> None:
    # a forked child does not hold its parent's locks (its pid is not in the files)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
