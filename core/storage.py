"""Where experiments live: a local folder or a cloud URI (s3://, gs://), through pyarrow filesystems.

Ray Tune writes experiments through the same pyarrow filesystems, so the report and resume paths
read exactly what Tune wrote, wherever that is. The files an experiment holds are named in
core/experiment_folder.py.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(location: str) -> bool:
    return "://" in location


def absolute(location: str) -> str:
    """Local paths become absolute (Tune requires it); URIs pass through."""
    return location if is_uri(location) else str(Path(location).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    """Append path parts; a URI keeps its query (s3://b/p?endpoint_override=...) at the end."""
    if is_uri(location):
        base, sep, query = location.partition("?")
        return "/".join([base.rstrip("/"), *parts]) + sep + query
    return str(Path(location, *parts))


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path for a local path or URI."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), absolute(location)


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(location: str) -> str:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def write_text(location: str, text: str) -> None:
    """Write a file atomically where the filesystem allows (local: temp file + rename)."""
    write_bytes(location, text.encode("utf-8"))


def write_bytes(location: str, data: bytes) -> None:
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0] if "/" in path else path, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            # A full disk or file-size limit must not leave a partial temp file behind.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    with fs.open_output_stream(path) as f:  # object stores publish a whole object at close
        f.write(data)


def list_dirs(location: str) -> list[str]:
    """Names of the immediate sub-folders of a folder."""
    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def list_files(location: str) -> list[str]:
    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def check_writable(location: str) -> str | None:
    """Return a problem message if results cannot be written under `location`, else None."""
    problem = _missing_bucket(location)
    if problem:
        return problem
    probe = join(location, f".qlora-sweep-write-test-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"ok")
        fs, path = filesystem(probe)
        fs.delete_file(path)
    except Exception as exc:  # permissions, full disk, missing bucket, bad credentials
        return (
            f"storage: cannot write to {location} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Choose a writable folder or bucket with --storage or the spec's storage key"
        )
    return None


# Where pyarrow's S3 client (and boto3) take a custom endpoint from (MinIO, moto, other S3 APIs).
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
# The command that creates a missing bucket, by URI scheme.
_MAKE_BUCKET = {"s3": "aws s3 mb", "gs": "gcloud storage buckets create", "gcs": "gcloud storage buckets create"}


def _missing_bucket(location: str) -> str | None:
    """A clear message when a URI's bucket does not exist; pyarrow's own names an option we do not use."""
    scheme = location.split("://", 1)[0] if is_uri(location) else ""
    if scheme not in _MAKE_BUCKET:
        return None
    try:
        fs, path = filesystem(location)
        bucket = path.split("/", 1)[0]
        missing = bool(bucket) and fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except Exception:  # bad credentials, unreachable endpoint: the write probe reports those
        return None
    if not missing:
        return None
    endpoint = next((f" at {os.environ[n]} ({n})" for n in ENDPOINT_ENV if os.environ.get(n)), "")
    return (
        f"storage: bucket '{bucket}' of {location} does not exist{endpoint if scheme == 's3' else ''}, "
        f"or these credentials cannot see it. Create it first (`{_MAKE_BUCKET[scheme]} {scheme}://{bucket}`) "
        "or set --storage / the spec's storage key to a bucket you can write"
    )

