"""The one filesystem layer: local paths and object-store URIs (s3://, gs://) through pyarrow.fs.

Commits are atomic everywhere. On a local or mounted disk a file is written under a hidden temporary
name in the same folder and renamed; on an object store there is no rename, but a single PUT (or a
multipart upload, completed only on close) makes the object appear whole or not at all.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# A temporary is `.<final name>.tmp-<uuid>`: hidden, and it ends in no shard suffix, so no glob for
# `*.parquet` (ours, fsspec's, a user's) can mistake a half-written file for a shard.
TMP_MARK = ".tmp-"


def temporary_name(final: str) -> str:
    return f".{final}{TMP_MARK}{uuid.uuid4().hex[:8]}"


def is_temporary(name: str) -> bool:
    # the second form is what versions before 0.2 wrote (`.tmp-<uuid>-<name>`)
    return (name.startswith(".") and TMP_MARK in name) or name.startswith(TMP_MARK)


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if is_uri(path):
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs, inner.rstrip("/")
    if path.startswith("file://"):
        path = path[len("file://") :]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def join(base: str, *parts: str) -> str:
    """Join with '/' (URIs) or os.sep (local), keeping a URI's scheme intact."""
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


class Location:
    """A folder on some filesystem, addressed by the string the user gave (path or URI)."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/") if is_uri(uri) else uri
        self.fs, self.path = resolve(uri)

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def child(self, *parts: str) -> Location:
        return Location(join(self.uri, *parts))

    def file(self, name: str) -> str:
        """Path of a file in this folder, inside self.fs."""
        return self.path + "/" + name

    @property
    def local(self) -> bool:
        return is_local(self.fs)

    def makedirs(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def exists(self, name: str | None = None) -> bool:
        info = self.fs.get_file_info(self.file(name) if name else self.path)
        return info.type != pafs.FileType.NotFound

    def sizes(self, suffix: str = "", include_hidden: bool = False) -> dict[str, int]:
        """{name: bytes} of the files directly in this folder (empty when it does not exist).

        Hidden (`.x`, temporaries among them) and bookkeeping (`_x`) files are left out unless asked for."""
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            return {}
        entries = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        out = {}
        for e in entries:
            if e.type != pafs.FileType.File:
                continue
            name = e.path.rsplit("/", 1)[-1]
            if not include_hidden and name.startswith((".", "_")):
                continue
            if name.endswith(suffix):
                out[name] = e.size
        return dict(sorted(out.items()))

    def list(self, suffix: str = "", include_hidden: bool = False) -> list[str]:
        """Names of the files directly in this folder, sorted (see `sizes` for what is left out)."""
        return list(self.sizes(suffix, include_hidden))

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.file(name)) as fh:
            return fh.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic commit of a whole file: a reader sees the old file, or none, or all of the new one."""
        final = self.file(name)
        if not self.local:  # object stores have no folders to make: a makedirs would be one more request
            with self.fs.open_output_stream(final) as fh:  # one PUT / multipart completed on close
                fh.write(data)
            return
        self.makedirs()
        tmp = self.file(temporary_name(name))
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self.file(name))
        except FileNotFoundError:
            pass

    def delete_tree(self) -> None:
        if self.exists():
            self.fs.delete_dir(self.path)

    def remove_stale_temporaries(self) -> int:
        """Temporary files left by a crashed writer (local disks only; object stores have none)."""
        names = [n for n in self.list(include_hidden=True) if is_temporary(n)]
        for n in names:
            self.delete(n)
        return len(names)


def read_bytes(path: str) -> bytes:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as fh:
        return fh.read()


def parquet_bytes(table: pa.Table, metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a table to Parquet in memory (shards are small), with key-value file metadata."""
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    sink = pa.BufferOutputStream()
    # PNG bytes are already compressed: zstd on them only costs time.
    pq.write_table(table, sink, compression="none")
    return sink.getvalue().to_pybytes()


def read_parquet_footer(loc: Location, name: str) -> pq.FileMetaData:
    """The footer only (row count, schema, key-value metadata): cheap even for big shards."""
    with loc.fs.open_input_file(loc.file(name)) as fh:
        return pq.ParquetFile(fh).metadata


def footer_metadata(meta: pq.FileMetaData) -> dict[str, str]:
    """A Parquet footer's key-value metadata as text (where our shards keep fingerprint and unit)."""
    return {k.decode(): v.decode() for k, v in (meta.metadata or {}).items()}


def footers(loc: Location, names: Iterable[str], threads: int = 32) -> dict[str, pq.FileMetaData | Exception]:
    """Footers of many shards at once: object stores answer in ~20 ms a request, so read them in parallel."""
    names = list(names)
    if not names:
        return {}

    def one(n: str) -> pq.FileMetaData | Exception:
        try:
            return read_parquet_footer(loc, n)
        except Exception as e:  # unreadable = to be redone; the caller decides
            return e

    with ThreadPoolExecutor(max_workers=min(threads, len(names))) as pool:
        return dict(zip(names, pool.map(one, names)))


def check_writable(loc: Location) -> None:
    """Create the folder and write+delete a probe file; raises OSError with the reason if that fails."""
    loc.makedirs()
    probe = temporary_name("probe")
    loc.write_bytes(probe, b"ok")
    loc.delete(probe)
