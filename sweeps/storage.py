"""Where experiments live: a local folder or a cloud URI (s3://, gs://), through pyarrow filesystems.

Ray Tune writes experiments through the same pyarrow filesystems, so the report and resume paths
read exactly what Tune wrote, wherever that is.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs

# Files a qlora-sweep experiment folder always holds; used to refuse foreign folders.
SPEC_FILE = "sweep_spec.yaml"


def is_uri(location: str) -> bool:
    return "://" in location


def absolute(location: str) -> str:
    """Local paths become absolute (Tune requires it); URIs pass through."""
    return location if is_uri(location) else str(Path(location).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    if is_uri(location):
        return "/".join([location.rstrip("/"), *parts])
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
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
