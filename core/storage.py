"""Where experiments live: a local folder or a cloud URI (s3://, gs://), through pyarrow filesystems.

Ray Tune writes experiments through the same pyarrow filesystems, so the report and resume paths
read exactly what Tune wrote, wherever that is. The files an experiment holds are named in
core/experiment_folder.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pyarrow.fs as pafs

from core.redact import split_userinfo


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
    """The pyarrow filesystem and in-filesystem path for a local path or URI.

    S3 credentials given in a URI, or remembered from one (`without_credentials`), are used; the
    filesystem returned never pickles them (`S3FileSystemKeysInMemory`).
    """
    if is_uri(location):
        location = without_credentials(location)
        fs, path = pafs.FileSystem.from_uri(location)
        scope = _scope(location)
        if scope in _CREDENTIALS and isinstance(fs, pafs.S3FileSystem):
            fs = _s3_with_credentials(_public_options(fs), scope)
        return fs, path
    return pafs.LocalFileSystem(), absolute(location)


# --- credentials in a location ------------------------------------------------------------------
# pyarrow accepts S3 keys inside a URI: s3://ACCESS_KEY:SECRET_KEY@bucket/prefix?endpoint_override=...
# A location flows into everything a sweep writes (sweep_spec.yaml, the report, Ray's tuner.pkl
# and experiment state, the console), so the keys are taken out of it where it enters
# (`without_credentials`) and kept in this process's memory only, for the bucket and endpoint they
# came with. Trial workers get them from the driver's worker setup hook (sweeps/driver.py), never
# through a file. A process that has none (a later `resume` or `report`) uses the AWS default chain:
# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, an instance profile.

# (bucket, endpoint_override) -> (access key, secret key)
_CREDENTIALS: dict[tuple[str, str], tuple[str, str]] = {}
_S3_SECRET_OPTIONS = ("access_key", "secret_key", "session_token")
_AUTHORITY = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)$", re.DOTALL)


def without_credentials(location: str) -> str:
    """`location` without the `KEY:SECRET@` of an s3:// URI; the keys are remembered in this process.

    Other locations are returned as they are (a local path, a URI without userinfo).
    """
    if not location.startswith("s3://"):
        return location
    userinfo, rest = split_userinfo(location.removeprefix("s3://"))
    if userinfo is None:
        return location
    clean = f"s3://{rest}"
    key, _, secret = userinfo.partition(":")
    _CREDENTIALS[_scope(clean)] = (unquote(key), unquote(secret))
    return clean


def has_remembered_credentials(location: str) -> bool:
    """Whether this process holds S3 keys (from `without_credentials`) for `location`."""
    return is_uri(location) and _scope(location) in _CREDENTIALS


def remembered_credentials() -> dict[tuple[str, str], tuple[str, str]]:
    """What this process remembers, for handing to trial workers in memory (`remember_credentials`)."""
    return dict(_CREDENTIALS)


def remember_credentials(credentials: dict[tuple[str, str], tuple[str, str]]) -> None:
    _CREDENTIALS.update(credentials)


def for_ray(location: str) -> tuple[str, pafs.FileSystem | None]:
    """What Ray Tune gets as its storage (RunConfig storage_path / storage_filesystem).

    With remembered S3 keys: the path inside the filesystem and a filesystem holding the keys, whose
    pickle (Ray pickles it into tuner.pkl, its experiment state and every trial) leaves them out.
    Otherwise the location itself, which Ray resolves as pyarrow does.
    """
    if not has_remembered_credentials(location):
        return location, None
    fs, path = filesystem(location)
    return path, fs


class S3FileSystemKeysInMemory(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with keys that stay in memory: its pickle carries every option but the
    keys, and unpickling takes them from the process's remembered credentials (else the AWS default
    chain)."""

    def __init__(self, scope: tuple[str, str], **options: Any):
        super().__init__(**options)
        self._scope = scope

    def __reduce__(self) -> tuple[Any, ...]:
        return _s3_from_memory, (_public_options(self), self._scope)


def _public_options(fs: pafs.S3FileSystem) -> dict[str, Any]:
    options = dict(pafs.S3FileSystem.__reduce__(fs)[1][0])
    for name in _S3_SECRET_OPTIONS:
        options.pop(name, None)
    return options


def _s3_with_credentials(options: dict[str, Any], scope: tuple[str, str]) -> S3FileSystemKeysInMemory:
    key, secret = _CREDENTIALS[scope]
    return S3FileSystemKeysInMemory(scope, **options, access_key=key, secret_key=secret)


def _s3_from_memory(options: dict[str, Any], scope: tuple[str, str]) -> pafs.S3FileSystem:
    if scope in _CREDENTIALS:
        return _s3_with_credentials(options, scope)
    return pafs.S3FileSystem(**options)


def _scope(location: str) -> tuple[str, str]:
    """(bucket, endpoint_override) of a credential-free URI: where its keys apply."""
    match = _AUTHORITY.match(location)
    if match is None:
        return ("", "")
    query = parse_qs(urlsplit(location).query)
    return match.group(2).rpartition("@")[2], (query.get("endpoint_override") or [""])[0]


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(location: str) -> str:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


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

