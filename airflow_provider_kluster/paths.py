"""Local paths and object storage alike: how the provider names, writes and moves files."""

from __future__ import annotations

import os
import pathlib
import uuid
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

#: Anything the provider accepts as a file location: a local path, a URI (``s3://…``) or an ObjectStoragePath.
PathLike: TypeAlias = "str | os.PathLike[str] | ObjectStoragePath"


def as_path(location: PathLike) -> pathlib.Path | ObjectStoragePath:
    """Turn a local path, ``file://`` or object-storage URI, or an ObjectStoragePath into a path object."""
    if isinstance(location, pathlib.PurePath) or hasattr(location, "fs"):
        return location  # type: ignore[return-value]
    text = os.fspath(location)
    if "://" in text:
        from airflow.sdk import ObjectStoragePath

        return ObjectStoragePath(text)
    return pathlib.Path(text)


def temp_sibling(dest: Any) -> Any:
    """Return a unique hidden name beside ``dest`` to write to before moving the result into place."""
    return dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.part"


def move_into_place(tmp: Any, dest: Any) -> None:
    """Replace ``dest`` with ``tmp``: atomically for local files, with the filesystem's move elsewhere."""
    if hasattr(dest, "fs"):  # ObjectStoragePath (a pathlib.Path subclass in older universal-pathlib)
        # Its rename differs across universal-pathlib versions; fsspec's mv is stable.
        tmp.fs.mv(tmp.path, dest.path)
    else:
        os.replace(tmp, dest)
