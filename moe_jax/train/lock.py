"""One writer per run directory: a lock file in the workdir that names its holder.

    with lock.hold(workdir):  # WorkdirLockedError, naming the holder, if another run writes it
        ...train...

`workdir/writer.lock` is JSON: host, pid (and the pid's start time, so a reused pid is not
taken for the holder), when the run started, when the lock was last renewed, the lease, and the
SLURM job and restart count when the holder runs under SLURM. It appears atomically and whole,
with each store's own primitive (`LockFile`, `LockObject`): on a file system a complete
temporary file is hard-linked to the name, which fails if the name exists (also on NFS); on
Cloud Storage (gs://) the object is uploaded with the precondition "generation 0" (create only
if absent), and renewals, take-overs and the removal carry the generation last read, so that
each fails if another process changed the lock in between. A thread renews it every
`lease_seconds / 4` and the lock is removed at exit.

A lock is stale, and is taken over with a warning that says why, when
  - its holder ran on this host and that process is gone;
  - it was not renewed for `lease_seconds` (its holder ran on another host and died; the hosts'
    clocks must agree to well within the lease);
  - it was left by an earlier run of this SLURM job (a requeued task: same SLURM_JOB_ID, lower
    SLURM_RESTART_COUNT) on another host: the requeued task waits until that copy's lease runs
    out, and refuses if the copy is still renewing it.
Otherwise the run refuses to start. Only process 0 of a multi-process run holds the lock; the
other processes learn its outcome through a collective and raise the same error.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from moe_jax.utils import storage

LOCK_FILE = "writer.lock"
LEASE_SECONDS = 120.0

logger = logging.getLogger(__name__)


class WorkdirLockedError(RuntimeError):
    """Another process writes this run directory."""


def _pid_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the holder's process (on this host) still runs."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    start = holder.get("pid_start")
    return start is None or _pid_start(pid) in (None, start)


def _slurm() -> tuple[str | None, int]:
    return os.environ.get("SLURM_JOB_ID") or None, int(os.environ.get("SLURM_RESTART_COUNT", 0))


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def describe(holder: dict[str, Any]) -> str:
    """'pid 12 on host gpu3 since 2026-12-01T10:00:00+00:00 (SLURM job 55)'."""
    job = f" (SLURM job {holder['slurm_job']})" if holder.get("slurm_job") else ""
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since "
            f"{_iso(holder.get('started', 0.0))}{job}")


class LockFile:
    """The lock on a file system: created by hard-linking a complete temporary file to its
    name; taken over by moving the stale lock aside first. A version is the content read."""

    def __init__(self, path: str, token: str) -> None:
        self.path = path
        self.token = token

    def read(self, path: str | None = None) -> tuple[dict[str, Any] | None, Any]:
        """(content, version): None if there is no lock; {} if it is not a lock we can read."""
        try:
            with open(path or self.path) as f:
                content = json.load(f)
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError):
            return {}, {}
        content = content if isinstance(content, dict) else {}
        return content, content

    def _write_temporary(self, content: dict[str, Any]) -> str:
        tmp = f"{self.path}.{self.token}.tmp"
        with open(tmp, "w") as f:
            json.dump(content, f)
        return tmp

    def create(self, content: dict[str, Any]) -> bool:
        """Puts a complete lock at `path` unless one exists; True if this call made it."""
        tmp = self._write_temporary(content)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def take_over(self, version: Any, content: dict[str, Any]) -> bool:
        """Replaces the stale lock `version` with `content`; False if another process changed
        the lock in between (the caller looks again)."""
        aside = f"{self.path}.{self.token}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = self.read(aside)[0]
        if moved != version:  # someone else took it over first: put theirs back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            os.unlink(aside)
            return False
        os.unlink(aside)
        return self.create(content)

    def renew(self, version: Any, content: dict[str, Any]) -> bool:
        """Rewrites the lock, which the caller has just read as its own."""
        os.replace(self._write_temporary(content), self.path)
        return True

    def remove(self, version: Any) -> None:
        """Deletes the lock, which the caller has just read as its own."""
        os.unlink(self.path)


class LockObject:
    """The lock as a Cloud Storage object. A version is the object's generation; every write
    is conditional on it (0: the object must not exist), so exactly one of two racing
    processes succeeds."""

    def __init__(self, path: str) -> None:
        from google.api_core import exceptions

        self.path = path
        self._exceptions = exceptions
        self._conflict = (exceptions.PreconditionFailed, exceptions.NotFound)
        bucket, name = storage.bucket_and_name(path)
        self._bucket = storage.gcs_client(path).bucket(bucket)
        self._name = name

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except self._exceptions.GoogleAPIError as err:
            raise storage.gcs_error(self.path, err) from err

    def read(self) -> tuple[dict[str, Any] | None, Any]:
        for _ in range(3):
            blob = self._call(self._bucket.get_blob, self._name)
            if blob is None:
                return None, None
            try:
                data = blob.download_as_bytes(if_generation_match=blob.generation)
            except self._conflict:
                continue  # replaced or removed since: read again
            except self._exceptions.GoogleAPIError as err:
                raise storage.gcs_error(self.path, err) from err
            try:
                content = json.loads(data)
            except ValueError:
                return {}, blob.generation
            return (content if isinstance(content, dict) else {}), blob.generation
        raise storage.StorageError(f"{self.path} keeps changing; is the run started "
                                   "several times?")

    def _write(self, content: dict[str, Any], generation: int) -> bool:
        try:
            self._call(self._bucket.blob(self._name).upload_from_string, json.dumps(content),
                       content_type="application/json", if_generation_match=generation)
        except storage.StorageError as err:
            # Generation 0: the lock exists. Another: it changed (or went) since it was read.
            if isinstance(err.__cause__, self._conflict if generation else
                          self._exceptions.PreconditionFailed):
                return False
            raise
        return True

    def create(self, content: dict[str, Any]) -> bool:
        return self._write(content, 0)

    def take_over(self, version: Any, content: dict[str, Any]) -> bool:
        return self._write(content, version)

    def renew(self, version: Any, content: dict[str, Any]) -> bool:
        return self._write(content, version)

    def remove(self, version: Any) -> None:
        with contextlib.suppress(*self._conflict):
            self._bucket.blob(self._name).delete(if_generation_match=version)


def lock_file(path: str, token: str) -> LockFile | LockObject:
    """The lock at `path` in its store; StorageError for a store without create-if-absent."""
    if not storage.is_url(path):
        return LockFile(path, token)
    if storage.scheme(path) == "gs":
        return LockObject(path)
    raise storage.StorageError(
        f"{path}: the writer lock needs an atomic create-if-absent, which moe_jax implements for "
        f"local paths and gs:// only, not {storage.scheme(path)}://. Train in a local directory "
        "(or a mounted bucket) or in gs://.")


class WorkdirLock:
    """The writer lock of one run directory (`acquire`, `release`; renewed by a thread)."""

    def __init__(self, workdir: str, *, lease_seconds: float = LEASE_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self.workdir = storage.absolute(workdir)
        self.path = storage.join(self.workdir, LOCK_FILE)
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.token = uuid.uuid4().hex
        self.held = False
        self._file: LockFile | LockObject | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def file(self) -> LockFile | LockObject:
        if self._file is None:
            self._file = lock_file(self.path, self.token)
        return self._file

    def _content(self, started: float) -> dict[str, Any]:
        job, restart = _slurm()
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_start": _pid_start(os.getpid()), "started": started,
                "renewed": self.clock(), "lease_seconds": self.lease_seconds,
                "slurm_job": job, "slurm_restart": restart}

    def _read(self) -> dict[str, Any] | None:
        """The lock's content; None if there is no lock; {} if it is not a lock we can read."""
        return self.file.read()[0]

    def _stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why `holder` no longer writes the directory, or None if it may still."""
        if not holder:
            return "it is not a lock file this code wrote"
        age = self.clock() - float(holder.get("renewed", 0.0))
        if holder.get("host") == socket.gethostname():
            if holder.get("pid") == os.getpid():
                return "it was left by this process"
            if not _alive(holder):
                return "that process is gone"
            return None
        if age > float(holder.get("lease_seconds", self.lease_seconds)):
            return f"its lease ran out (last renewed {age:.0f} s ago)"
        return None

    def _earlier_copy_of_this_job(self, holder: dict[str, Any]) -> bool:
        job, restart = _slurm()
        return (job is not None and holder.get("slurm_job") == job
                and int(holder.get("slurm_restart") or 0) < restart)

    def _wait_for_lease(self, holder: dict[str, Any]) -> str | None:
        """Waits (at most one lease) for a requeued job's earlier copy to stop renewing."""
        lease = float(holder.get("lease_seconds", self.lease_seconds))
        logger.warning("%s is locked by an earlier run of this SLURM job (%s); waiting up to "
                       "%.0f s for its lease to run out.", self.workdir, describe(holder), lease)
        deadline = time.monotonic() + lease + 1.0
        while time.monotonic() < deadline:
            time.sleep(min(5.0, lease / 8))
            current = self._read()
            if current is None or current.get("token") != holder.get("token"):
                return "it was released"
            if current.get("renewed") != holder.get("renewed"):
                return None  # still renewed: the earlier copy runs
        return "the earlier run of this SLURM job stopped renewing it (requeued)"

    def acquire(self) -> str | None:
        """Takes the lock; returns the takeover message if it replaced a stale one. Raises
        WorkdirLockedError naming the holder if another live process has it."""
        storage.makedirs(self.workdir)
        message = None
        for _ in range(5):
            # Read first, then create only if absent: the create's own precondition decides a
            # race, and the read also stops a second writer where a store ignores preconditions
            # (the Cloud Storage emulator does).
            holder, version = self.file.read()
            if holder is None:
                if self.file.create(self._content(self.clock())):
                    break
                continue  # created by another process meanwhile: look again
            if holder.get("token") == self.token:
                break  # ours: a create whose reply was lost and that the client retried
            reason = self._stale_reason(holder)
            if reason is None and self._earlier_copy_of_this_job(holder):
                reason = self._wait_for_lease(holder)
            if reason is None:
                raise self._locked_error(holder)
            if self.file.take_over(version, self._content(self.clock())):
                message = (f"taking over the lock of {self.workdir} from {describe(holder)}: "
                           f"{reason}.")
                logger.warning(message)
                break
        else:
            raise WorkdirLockedError(f"could not take the lock {self.path}: other processes "
                                     "keep changing it; is the run started several times?")
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name=f"lock:{self.workdir}")
        self._thread.start()
        return message

    def _locked_error(self, holder: dict[str, Any]) -> WorkdirLockedError:
        age = self.clock() - float(holder.get("renewed", 0.0))
        return WorkdirLockedError(
            f"run directory {self.workdir} is in use: {describe(holder)} writes it (lock "
            f"{self.path}, renewed {age:.0f} s ago). Two runs in one directory would interleave "
            "metrics.jsonl and race on its checkpoints. Wait for that run to end or stop it, or "
            f"use another --workdir; if that process is gone for good, delete {self.path}.")

    def renew(self) -> bool:
        """Rewrites the lock with a fresh `renewed` time; False (and a warning) if it is no
        longer ours."""
        current, version = self.file.read()
        if (current is None or current.get("token") != self.token
                or not self.file.renew(version, {**current, "renewed": self.clock()})):
            current = self._read()  # changed since it was read: say by whom
            logger.error("the lock %s of this run was %s; another process may now write %s.",
                         self.path, "removed" if current is None else
                         f"taken over by {describe(current)}", self.workdir)
            return False
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_seconds / 4):
            try:
                if not self.renew():
                    return
            except Exception as err:  # a file-system or network hiccup: try at the next renewal
                logger.warning("could not renew %s: %s", self.path, err)

    def release(self) -> None:
        """Stops renewing and removes the lock if it is still ours."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.held = False
        current, version = self.file.read()
        if current is not None and current.get("token") == self.token:
            self.file.remove(version)


@contextlib.contextmanager
def hold(workdir: str, *, lease_seconds: float = LEASE_SECONDS) -> Iterator[WorkdirLock | None]:
    """Holds the writer lock of `workdir` on process 0 for the duration of the block; every
    process raises WorkdirLockedError if process 0 could not take it (StorageError if the store
    could not be reached: a missing bucket, missing credentials)."""
    import jax

    from moe_jax.train import placement

    lock = WorkdirLock(workdir, lease_seconds=lease_seconds) if jax.process_index() == 0 \
        else None
    kind, error = "", ""
    if lock is not None:
        try:
            lock.acquire()
        except WorkdirLockedError as err:
            kind, error = "locked", str(err)
        except storage.StorageError as err:
            kind, error = "storage", str(err)
        except OSError as err:  # e.g. a read-only run directory: the other processes stop too
            kind, error = "locked", f"could not take the lock {lock.path}: {err}"
    kind, error = placement.allgather_json([kind, error])[0]
    if error:
        raise storage.StorageError(error) if kind == "storage" else WorkdirLockedError(error)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
