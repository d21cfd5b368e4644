"""A local Cloud Storage emulator for the gs:// tests and for trying gs:// run directories by hand.

    python tests/gcs_emulator.py --port=9023 --bucket=moe-jax-test   # prints what to export

It is gcp-storage-emulator (pure Python, in memory) with two behaviours of Cloud Storage that
moe_jax relies on and that emulator lacks:
  - a download answers with the object's generation in `x-goog-generation` (tensorstore, which
    orbax writes arrays with, keeps the generation it read for later conditional requests;
    without the header it keeps 0 and a later request fails with "Malformed StorageGeneration");
  - an upload or a delete with `ifGenerationMatch=N` is refused with 412 Precondition Failed
    unless the object's generation is N (0: it does not exist), as the writer lock needs.
Both are added by wrapping the emulator's request handlers; nothing else changes.

`environment(url)` holds the variables that point the clients at it: STORAGE_EMULATOR_HOST
(google-cloud-storage, gcsfs), TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING
(tensorstore), and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (gcsfs would otherwise ask the
storage-control API, which the emulator does not serve, for each bucket's layout).
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from absl import flags

from moe_jax.utils import cli

_local = threading.local()  # the ifGenerationMatch of the request being handled


class _PreconditionFailedError(Exception):
    pass


def environment(url: str) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _generation(storage: Any, bucket: str, name: str) -> int:
    """The object's generation; 0 when there is none."""
    from gcp_storage_emulator.exceptions import NotFound

    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return 0


def _refuse(response: Any, message: str) -> None:
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({"error": {"code": 412, "message": message,
                             "errors": [{"reason": "conditionNotMet", "message": message}]}})


def _expected(request: Any) -> int | None:
    values = request.query.get("ifGenerationMatch")
    return int(values[0]) if values else None


def _uploading(handler: Any) -> Any:
    """An upload handler whose object is written only if its generation is the request's
    ifGenerationMatch (checked where the object is created: at the end of a resumable one)."""
    @functools.wraps(handler)
    def wrapped(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
        _local.expected = _expected(request)
        try:
            return handler(request, response, storage, *args, **kwargs)
        except _PreconditionFailedError as err:
            _refuse(response, str(err))
        finally:
            _local.expected = None
    return wrapped


def _deleting(handler: Any) -> Any:
    @functools.wraps(handler)
    def wrapped(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
        expected = _expected(request)
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        if expected is not None and _generation(storage, bucket, name) != expected:
            return _refuse(response, f"{name} is not at generation {expected}")
        return handler(request, response, storage, *args, **kwargs)
    return wrapped


def _downloading(handler: Any) -> Any:
    """A GET handler that adds the object's generation headers to a media download."""
    @functools.wraps(handler)
    def wrapped(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
        result = handler(request, response, storage, *args, **kwargs)
        media = handler.__name__ == "download" or request.query.get("alt") == ["media"]
        if media and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            obj = storage.get_file_obj(request.params["bucket_name"],
                                       request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])
        return result
    return wrapped


def _checked_create_file(create_file: Any, storage: Any) -> Any:
    @functools.wraps(create_file)
    def wrapped(bucket: str, name: str, *args: Any, **kwargs: Any) -> Any:
        expected = getattr(_local, "expected", None)
        if expected is not None and _generation(storage, bucket, name) != expected:
            raise _PreconditionFailedError(f"{name} is not at generation {expected}")
        return create_file(bucket, name, *args, **kwargs)
    return wrapped


@functools.cache
def _patch_handlers() -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    wrappers = {objects.insert: _uploading, objects.upload_partial: _uploading,
                objects.delete: _deleting, objects.get: _downloading,
                objects.download: _downloading}
    for _, methods in server.HANDLERS:
        for method, handler in methods.items():
            if handler in wrappers:
                methods[method] = wrappers[handler](handler)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(bucket: str, port: int | None = None, host: str = "127.0.0.1") -> tuple[Any, str]:
    """Starts the emulator (in this process, in memory) with `bucket`; returns (server, url).
    Stop it with server.stop()."""
    from gcp_storage_emulator.server import create_server

    _patch_handlers()
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # every 404 is logged
    port = port or free_port()
    server = create_server(host, port, in_memory=True, default_bucket=bucket)
    storage = server._storage
    storage.create_file = _checked_create_file(storage.create_file, storage)
    server.start()
    return server, f"http://{host}:{port}"


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_integer("port", 9023, "the port to serve on", flag_values=values)
    flags.DEFINE_string("bucket", "moe-jax-test", "the bucket to create", flag_values=values)


def main(argv: Sequence[str] | None = None) -> None:
    args, _ = cli.parse_flags(define_flags, argv, __doc__)
    server, url = start(args.bucket, args.port)
    exports = " ".join(f"{k}={v}" for k, v in environment(url).items())
    print(f"Cloud Storage emulator at {url} with bucket gs://{args.bucket}; in another shell:\n"
          f"  export {exports}", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
