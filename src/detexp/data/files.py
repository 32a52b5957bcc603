"""Where a dataset's files are: a local folder, or a URI that pyarrow's filesystems open
(``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``).

:class:`DataRoot` is the one door to a dataset's bytes. Paths inside it are relative and
``/``-separated, whatever the filesystem, so the same relative path names a file in a
problems table, in a Ray Data row and on every node. A DataRoot pickles as its location
string: each process (the driver, every Ray Data task) opens the filesystem itself, with the
credentials pyarrow finds in that process's environment (``AWS_ACCESS_KEY_ID``, ...).
Nothing here imports torch or Ray.
"""

from __future__ import annotations

import io
import os
import posixpath
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

from detexp.errors import DatasetError


def is_uri(location: str) -> bool:
    """``s3://...``, ``gs://...`` and the like (but not a Windows drive letter)."""
    scheme, sep, _ = str(location).partition("://")
    return bool(sep) and len(scheme) > 1


@lru_cache(maxsize=8)
def _filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, base path) of ``uri``, opened once per process."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - ArrowInvalid for an unknown scheme, OSError for others
        raise DatasetError(f"dataset.root={uri}: pyarrow cannot open it ({first_line(exc)})") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


class DataRoot:
    """A dataset root: ``location`` is a local path (made absolute) or a URI."""

    def __init__(self, location: str | Path):
        location = str(location)
        self.remote = is_uri(location)
        if self.remote:  # a query holds the filesystem's options: ?endpoint_override=host:port&scheme=http
            base, sep, query = location.partition("?")
            self.location = base.rstrip("/") + sep + query
        else:
            self.location = str(Path(location).expanduser().resolve())

    def __reduce__(self):
        return (DataRoot, (self.location,))

    def __str__(self) -> str:
        return self.location

    def __repr__(self) -> str:
        return f"DataRoot({self.location!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DataRoot) and other.location == self.location

    def __hash__(self) -> int:
        return hash(self.location)

    # ----------------------------------------------------------------------- paths

    def _remote(self, rel: str) -> tuple[Any, str]:
        fs, base = _filesystem(self.location)
        return fs, posixpath.join(base, rel) if rel else base

    def local_path(self, rel: str = "") -> Path:
        """The local file of ``rel``; only for a local root."""
        assert not self.remote, "a remote root has no local paths"
        return Path(self.location, *[p for p in rel.split("/") if p])

    def display(self, rel: str = "") -> str:
        """``rel`` as a user would type it: the absolute path or the full URI."""
        if not rel:
            return self.location
        base, sep, query = self.location.partition("?") if self.remote else (self.location, "", "")
        return f"{base}/{rel}{sep}{query}"

    # ----------------------------------------------------------------------- reading

    def read_bytes(self, rel: str) -> bytes:
        """The file's bytes; FileNotFoundError when it does not exist."""
        if not self.remote:
            return self.local_path(rel).read_bytes()
        import pyarrow.fs

        fs, path = self._remote(rel)
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError:
            # S3 reports a missing key as a plain OSError on some pyarrow versions
            if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
                raise FileNotFoundError(self.display(rel)) from None
            raise

    def open(self, rel: str) -> str | BinaryIO:
        """Something PIL's ``Image.open`` takes: the path of a local file (read lazily, so a
        header costs no more than the header), or the remote file's bytes in memory."""
        if not self.remote:
            return str(self.local_path(rel))
        return io.BytesIO(self.read_bytes(rel))

    def is_dir(self, rel: str = "") -> bool:
        if not self.remote:
            return self.local_path(rel).is_dir()
        import pyarrow.fs

        fs, path = self._remote(rel)
        return fs.get_file_info(path).type == pyarrow.fs.FileType.Directory

    def is_file(self, rel: str) -> bool:
        if not self.remote:
            return self.local_path(rel).is_file()
        import pyarrow.fs

        fs, path = self._remote(rel)
        return fs.get_file_info(path).type == pyarrow.fs.FileType.File

    def listdir(self, rel: str = "") -> tuple[list[str], list[str]]:
        """(sorted file names, sorted folder names) directly inside ``rel``; both empty when
        it does not exist. Hidden names (``.DS_Store``, ``._x.jpg``) are left out."""
        files: list[str] = []
        dirs: list[str] = []
        if not self.remote:
            try:
                with os.scandir(self.local_path(rel)) as entries:
                    for entry in entries:
                        (dirs if entry.is_dir() else files).append(entry.name)
            except (FileNotFoundError, NotADirectoryError):
                pass
        else:
            import pyarrow.fs

            fs, path = self._remote(rel)
            for info in fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True)):
                (dirs if info.type == pyarrow.fs.FileType.Directory else files).append(info.base_name)
        return sorted(f for f in files if not f.startswith(".")), sorted(d for d in dirs if not d.startswith("."))


def as_root(root: DataRoot | str | Path) -> DataRoot:
    return root if isinstance(root, DataRoot) else DataRoot(root)


def join(*parts: str) -> str:
    """Relative ``/``-path of ``parts`` (empty parts dropped, no leading "./")."""
    return posixpath.normpath(posixpath.join(*[p for p in parts if p])) if any(parts) else ""


def inside(rel: str) -> bool:
    """Does the relative path stay inside the root (no ``..`` out of it, not absolute)?"""
    if not rel or "\x00" in rel or rel.startswith("/") or "\\" in rel and rel.startswith("\\"):
        return False
    normal = posixpath.normpath(rel)
    return normal != ".." and not normal.startswith("../") and not posixpath.isabs(normal)
