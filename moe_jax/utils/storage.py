"""Paths of run directories on a local disk or on object storage (`gs://bucket/path`).

A run directory (`--workdir`), `init.checkpoint` and the directories of the command-line
programs may be local paths or URLs that `etils.epath` opens: `gs://bucket/path` with
`pip install "moe_jax[gcs]"` (gcsfs; google-cloud-storage for the writer lock), or another
fsspec scheme. Local paths go through `os` as they always did; URLs through epath.

    workdir = storage.absolute(workdir)       # os.path.abspath, or the URL as given
    storage.write_text(storage.join(workdir, "summary.json"), text)   # whole or not at all
    log = JsonLines(storage.join(workdir, "metrics.jsonl"))
    log.append([{"step": 1, ...}]); log.read()

Object storage neither renames nor appends: a write is one upload (each object appears whole),
and a growing JSON-lines file is a series of objects (`JsonLines`). Listings are read fresh
from the store (gcsfs caches them per process, and other processes write the same directory).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from typing import Any

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# One object of a JsonLines file on object storage grows up to this size; then the next starts.
SEGMENT_BYTES = 4 * 2**20


class StorageError(OSError):
    """A path cannot be used: a missing bucket or client library, or missing credentials."""


def is_url(path: str) -> bool:
    """Whether `path` names object storage (gs://, s3://, ...) rather than a local file."""
    return bool(_URL.match(os.fspath(path)))


def scheme(path: str) -> str | None:
    return os.fspath(path).split("://", 1)[0] if is_url(path) else None


def absolute(path: str) -> str:
    """The local path made absolute, or the URL without a trailing slash."""
    path = os.fspath(path)
    return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def join(path: str, *names: str) -> str:
    return os.path.join(os.fspath(path), *names)


def bucket_and_name(url: str) -> tuple[str, str]:
    """("bucket", "path/in/bucket") of gs://bucket/path/in/bucket."""
    rest = os.fspath(url).split("://", 1)[1]
    bucket, _, name = rest.partition("/")
    return bucket, name.strip("/")


def uses_emulator() -> bool:
    """Whether the Cloud Storage clients are pointed at an emulator (no credentials then)."""
    return bool(os.environ.get("STORAGE_EMULATOR_HOST"))


_checked_credentials = False


def check_credentials(path: str) -> None:
    """Raises StorageError, saying how to provide them, if a gs:// path has no Google Cloud
    credentials to use (gcsfs would otherwise go on anonymously and fail later, obscurely)."""
    global _checked_credentials
    if scheme(path) != "gs" or uses_emulator() or _checked_credentials:
        return
    try:
        import google.auth
        import google.auth.exceptions
    except ImportError as err:
        raise StorageError(f"{path}: gs:// paths need gcsfs and google-cloud-storage: "
                           "pip install \"moe_jax[gcs]\"") from err

    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError as err:
        raise StorageError(credentials_message(path, err)) from err
    _checked_credentials = True


def credentials_message(path: str, err: Exception) -> str:
    return (f"no Google Cloud credentials to reach {path} ({err}). On a Cloud TPU or GCE VM the "
            "VM's service account is used: give it roles/storage.objectAdmin on the bucket. "
            "Elsewhere run `gcloud auth application-default login`, or set "
            "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file.")


def _filesystem(path: str) -> Any:
    """The fsspec file system that epath uses for a URL; StorageError naming what to install
    when its library is missing."""
    from etils.epath import backend

    try:
        return backend.fsspec_backend.fs(os.fspath(path))
    except ImportError as err:
        raise StorageError(f"{path}: {scheme(path)}:// paths need their fsspec library "
                           f"({err}); for gs:// install it with `pip install "
                           "\"moe_jax[gcs]\"` (gcsfs and google-cloud-storage).") from err


def _epath(path: str):
    """epath.Path of a URL, once its credentials and client library were checked."""
    from etils import epath

    check_credentials(path)
    _filesystem(path)
    return epath.Path(path)


def _fresh(path: str):
    """`_epath`, with the cached listings of the path and its parents forgotten (gcsfs caches
    them per process, and other processes write the same directories)."""
    p = _epath(path)
    _filesystem(path).invalidate_cache(os.fspath(path))
    return p


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    return _fresh(path).exists()


def isdir(path: str) -> bool:
    """Whether `path` is a directory; on object storage: whether objects lie under it."""
    if not is_url(path):
        return os.path.isdir(path)
    return _fresh(path).is_dir()


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    p = _fresh(path)
    return p.exists() and not p.is_dir()


def listdir(path: str) -> list[str]:
    """The names in directory `path` ([] when there is none)."""
    if not is_url(path):
        return os.listdir(path) if os.path.isdir(path) else []
    p = _fresh(path)
    return sorted(child.name for child in p.iterdir()) if p.is_dir() else []


def makedirs(path: str) -> None:
    """Creates a local directory and its parents; nothing on object storage, whose directories
    are the names' prefixes (and where creating one could create a bucket)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    return _epath(path).read_bytes()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Writes `path` whole or not at all: a temporary file renamed over it, or one upload."""
    if is_url(path):
        _epath(path).write_bytes(data)
        return
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, value: Any) -> None:
    """`value` as indented JSON, written whole (readers never see half a file)."""
    write_text(path, json.dumps(value, indent=2, sort_keys=True, allow_nan=True) + "\n")


def remove(path: str) -> None:
    """Deletes a file or a directory tree."""
    if not is_url(path):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    elif isdir(path):
        _epath(path).rmtree()
    else:
        _epath(path).unlink()


def glob(directory: str, pattern: str) -> list[str]:
    """The paths of the names in `directory` that match the shell pattern `pattern`."""
    return [join(directory, name) for name in listdir(directory)
            if fnmatch.fnmatchcase(name, pattern)]


def copy_file(source: str, target: str) -> None:
    """Copies the file `source` to the path `target`; either may be a URL."""
    if not is_url(source) and not is_url(target):
        shutil.copy2(source, target)
    else:
        write_bytes(target, read_bytes(source))


def download(directory: str, into: str) -> None:
    """Copies the files directly in `directory` (not its subdirectories) into local `into`."""
    for name in listdir(directory):
        if isfile(join(directory, name)):
            copy_file(join(directory, name), os.path.join(into, name))


def upload(local: str, directory: str) -> list[str]:
    """Copies the files directly in local `local` into `directory`; returns their names."""
    names = sorted(n for n in os.listdir(local) if os.path.isfile(os.path.join(local, n)))
    for name in names:
        copy_file(os.path.join(local, name), join(directory, name))
    return names


class LocalCopy:
    """A local directory (`path`) standing for `directory`: the directory itself when it is
    local; for a URL a temporary directory, filled from it first (`fetch`) and copied back by
    `publish`, removed at the end of the `with` block.

        with LocalCopy(url, fetch=True) as copy:   # e.g. for safetensors, which reads files
            read(copy.path)
        with LocalCopy(url) as copy:
            write(copy.path)
            copy.publish()
    """

    def __init__(self, directory: str, *, fetch: bool = False) -> None:
        self.directory = directory
        self.remote = is_url(directory)
        self.path = tempfile.mkdtemp(prefix="moe_jax_") if self.remote else directory
        if self.remote and fetch:
            download(directory, self.path)

    def publish(self) -> None:
        """Copies the local files to `directory` (nothing to do when it is local)."""
        if self.remote:
            upload(self.path, self.directory)

    def __enter__(self) -> LocalCopy:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.remote:
            shutil.rmtree(self.path, ignore_errors=True)


class JsonLines:
    """A JSON-lines file that grows, one JSON object per line.

    On a file system it is one file, appended to in place (opened for each append). Object
    storage cannot append, so there it is a series of objects `<name>`, `<name>.0001`,
    `<name>.0002`, ... read in that order (`gcloud storage cat '<name>*'` prints the whole
    file): each writer (a run, or a resumed run) starts a new object, rewrites it whole with
    every append, and starts the next one once it holds SEGMENT_BYTES; an earlier writer's
    objects are never written again.
    """

    def __init__(self, path: str, *, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.path = os.fspath(path)
        self.remote = is_url(self.path)
        self.segment_bytes = segment_bytes
        self._segment: int | None = None  # this writer's current object (remote)
        self._buffer: list[str] = []

    def _segment_path(self, index: int) -> str:
        return self.path if index == 0 else f"{self.path}.{index:04d}"

    def segments(self) -> list[str]:
        """The objects (or the one file) that hold the lines, in order."""
        if not self.remote:
            return [self.path] if os.path.exists(self.path) else []
        directory, base = os.path.split(self.path)
        pattern = re.compile(re.escape(base) + r"(\.\d{4,})?$")
        return [join(directory, name) for name in listdir(directory) if pattern.match(name)]

    def exists(self) -> bool:
        return bool(self.segments())

    def read(self) -> list[dict[str, Any]]:
        """Every record, in the order written. FileNotFoundError when there is none."""
        segments = self.segments()
        if not segments:
            raise FileNotFoundError(f"{self.path} does not exist")
        return [json.loads(line) for segment in segments
                for line in read_text(segment).splitlines() if line.strip()]

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        lines = [json.dumps(record, allow_nan=True) + "\n" for record in records]
        if not lines:
            return
        if not self.remote:
            with open(self.path, "a") as f:
                f.writelines(lines)
            return
        if self._segment is None:
            last = self.segments()
            self._segment = 0 if not last else _segment_index(last[-1], self.path) + 1
        elif sum(map(len, self._buffer)) >= self.segment_bytes:
            self._segment, self._buffer = self._segment + 1, []
        self._buffer.extend(lines)
        write_text(self._segment_path(self._segment), "".join(self._buffer))

    def rewrite(self, records: Iterable[dict[str, Any]]) -> None:
        """Replaces the whole file with `records` (later appends follow them)."""
        self.close()
        old = self.segments()
        lines = [json.dumps(record, allow_nan=True) + "\n" for record in records]
        if not self.remote:
            write_text(self.path, "".join(lines))
            return
        # The new content goes to a new object before the old ones are deleted.
        index = _segment_index(old[-1], self.path) + 1 if old else 0
        write_text(self._segment_path(index), "".join(lines))
        for segment in old:
            remove(segment)
        self._segment, self._buffer = index, lines

    def close(self) -> None:
        """Ends this writer: a later append starts a new object."""
        self._segment, self._buffer = None, []


def _segment_index(segment: str, path: str) -> int:
    return 0 if segment == path else int(segment.rsplit(".", 1)[1])


def gcs_client(path: str) -> Any:
    """A google-cloud-storage client (pointed at $STORAGE_EMULATOR_HOST when set) to reach
    `path`; StorageError saying what to do when the library or the credentials are missing."""
    try:
        from google.cloud import storage as gcs
    except ImportError as err:
        raise StorageError(f"{path}: gs:// paths need google-cloud-storage and gcsfs: "
                           "pip install \"moe_jax[gcs]\"") from err
    import google.auth.exceptions

    try:
        return gcs.Client()
    except google.auth.exceptions.DefaultCredentialsError as err:
        raise StorageError(credentials_message(path, err)) from err


def gcs_error(path: str, err: Exception) -> StorageError:
    """A Cloud Storage request's failure as a StorageError naming `path` and the fix."""
    from google.api_core import exceptions

    bucket = bucket_and_name(path)[0]
    if isinstance(err, exceptions.NotFound):
        return StorageError(f"{path}: the bucket gs://{bucket} does not exist. Create it "
                            f"(`gcloud storage buckets create gs://{bucket} --location=REGION`, "
                            "in the region of the TPU VMs) or fix the path.")
    if isinstance(err, exceptions.Unauthorized | exceptions.Forbidden):
        return StorageError(f"{path}: the credentials in use may not write gs://{bucket} ({err}). "
                            "Give the account (on a TPU VM: the VM's service account) "
                            "roles/storage.objectAdmin on the bucket.")
    return StorageError(f"{path}: {type(err).__name__}: {err}")
