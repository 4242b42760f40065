"""The one filesystem layer: local paths and object-store URIs (s3://, gs://) through pyarrow.fs.

Commits are atomic everywhere. On a local or mounted disk a file is written under a hidden temporary
name in the same folder and renamed; on an object store there is no rename, but a single PUT (or a
multipart upload, completed only on close) makes the object appear whole or not at all.

Reaching a store is bounded in time and fails in one line (`Unreachable`, a UserError): an unknown scheme
at once; an endpoint set by hand (AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST) that is closed at once, one that
is silent within GDD_RAY_TIMEOUT_S (reach.py: default 30 s), before the client is pointed at it; gs://
without credentials after a look for them (~1 s) instead of the Google client's long wait for a metadata
server. The clients themselves get the same timeout and few retries.
gs:// goes to the emulator named by STORAGE_EMULATOR_HOST when that is set (what Google's own clients read).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gdd_ray import reach

# Schemes an --out, --classes or export path may use; anything else is refused before it is tried.
SCHEMES = ("s3", "gs", "gcs", "file")

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


Unreachable = reach.Unreachable  # a store that cannot be used at all: unknown scheme, no credentials, no endpoint


class TooLarge(OSError):
    """A file over the size a reader accepts (class files, YAML configs)."""


def reason(e: BaseException) -> str:
    """One line saying why a storage call failed (pyarrow's and the Google client's messages run long)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def scheme_of(path: str) -> str:
    return path.split("://", 1)[0].lower() if "://" in path else "file"


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI; `Unreachable` in one line when it cannot be used."""
    if is_uri(path):
        scheme = scheme_of(path)
        if scheme not in SCHEMES:
            raise Unreachable(f"{path}: unknown storage scheme '{scheme}://'; use a local path, s3:// or gs://")
        if scheme in ("gs", "gcs"):
            return _gcs_filesystem(_gcs_emulator(), reach.timeout_s()), path.split("://", 1)[1].rstrip("/")
        try:
            fs, inner = pafs.FileSystem.from_uri(path)
        except (OSError, pa.ArrowException) as e:  # the bucket's region lookup: DNS, endpoint, credentials
            raise Unreachable(f"{path}: cannot reach the object store ({reason(e)})") from e
        if isinstance(fs, pafs.S3FileSystem):
            fs = _bounded_s3(fs, path)
        return fs, inner.rstrip("/")
    if path.startswith("file://"):
        path = path[len("file://") :]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _gcs_emulator() -> str | None:
    """STORAGE_EMULATOR_HOST as a URL (`host:port` or `http(s)://host:port`), checked; None when unset."""
    from gdd_ray import schema

    host = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    return schema.endpoint_url(host, "STORAGE_EMULATOR_HOST") if host else None


def _bounded_s3(fs: pafs.S3FileSystem, path: str) -> pafs.S3FileSystem:
    """The S3 client from_uri made (its region, endpoint, credentials chain), with the timeout of every other
    wait and three attempts a request; an endpoint set by hand (MinIO, an emulator) is asked for a first byte
    before it is used (reach.check_http)."""
    options = fs.__reduce__()[1][0]  # from_uri's resolved options, as the client pickles them for Ray workers
    limit = reach.timeout_s()
    if options.get("endpoint_override"):
        endpoint = options["endpoint_override"]
        url = endpoint if "://" in endpoint else f"{options.get('scheme') or 'https'}://{endpoint}"
        bucket = path.split("://", 1)[1].split("/", 1)[0]
        reach.check_http(url, f"s3://{bucket}")
    options.update(
        connect_timeout=limit, request_timeout=limit, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3)
    )
    return pafs.S3FileSystem(**options)


@functools.lru_cache(maxsize=4)
def _gcs_filesystem(emulator: str | None, limit: float) -> pafs.GcsFileSystem:
    """One client per endpoint (credentials are looked for once; a failed look is not cached); every request
    retried for at most `limit` seconds, and an emulator asked for a first byte before it is used."""
    retry = timedelta(seconds=limit)
    if emulator:
        reach.check_http(emulator, "STORAGE_EMULATOR_HOST")
        url = urllib.parse.urlparse(emulator)
        return pafs.GcsFileSystem(
            anonymous=True, scheme=url.scheme, endpoint_override=url.netloc, retry_time_limit=retry
        )
    why = _gcs_credentials_missing()
    if why:
        raise Unreachable(
            f"gs://: no Google Cloud credentials ({why}); set GOOGLE_APPLICATION_CREDENTIALS to a service-account "
            "key file, run `gcloud auth application-default login`, or run on a GCP VM / GKE pod with a service account"
        )
    return pafs.GcsFileSystem(retry_time_limit=retry)


def _gcs_credentials_missing() -> str | None:
    """Why no Google credentials can be found (None = some exist), looked for in a bounded time: the key file
    variable, gcloud's application-default file, then a metadata server (GCE, GKE) within a second."""
    key = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if key:
        return None if os.path.isfile(key) else f"GOOGLE_APPLICATION_CREDENTIALS={key} is not a file"
    gcloud = os.environ.get("CLOUDSDK_CONFIG") or os.path.join(os.path.expanduser("~"), ".config", "gcloud")
    if os.path.isfile(os.path.join(gcloud, "application_default_credentials.json")):
        return None
    host = os.environ.get("GCE_METADATA_HOST", "169.254.169.254")
    try:
        req = urllib.request.Request(f"http://{host}/computeMetadata/v1/", headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(req, timeout=1.0) as r:
            if r.headers.get("Metadata-Flavor") == "Google":
                return None
    except (OSError, ValueError):
        pass
    return "no key file, no gcloud login, no metadata server"


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

    def rename(self, name: str, new_name: str) -> None:
        """Move one file within this folder (object stores: copy, then delete)."""
        self.fs.move(self.file(name), self.file(new_name))

    def delete_tree(self) -> None:
        """Everything under this folder (object stores have no folders: their objects, one by one)."""
        if not self.exists():
            return
        if self.local:
            self.fs.delete_dir(self.path)
            return
        for e in self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True)):
            if e.type == pafs.FileType.File:
                try:
                    self.fs.delete_file(e.path)
                except FileNotFoundError:
                    pass
        try:
            self.fs.delete_dir(self.path)  # folder markers a client may have left
        except OSError:
            pass

    def remove_if_empty(self) -> None:
        """A local folder with nothing left in it goes (object stores have no empty folders)."""
        if self.local:
            try:
                os.rmdir(self.path)
            except OSError:
                pass

    def mtime(self, name: str) -> float | None:
        info = self.fs.get_file_info(self.file(name))
        return info.mtime.timestamp() if info.mtime is not None else None

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Commit a whole file only if no file of that name exists; False if one does. Exactly one of
        several concurrent callers wins: a hard link of a written temporary on disks (atomic on local
        filesystems and on NFS), a conditional PUT on object stores (S3 `If-None-Match: *`, GCS
        `ifGenerationMatch=0`)."""
        if self.local:
            self.makedirs()
            tmp = self.file(temporary_name(name))
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, self.file(name))
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
        bucket, _, key = self.file(name).partition("/")
        if isinstance(self.fs, pafs.S3FileSystem):
            return _s3_create_exclusive(self.fs, bucket, key, data)
        return _gcs_create_exclusive(bucket, key, data)

    def remove_stale_temporaries(self) -> int:
        """Temporary files left by a crashed writer (local disks only; object stores have none)."""
        names = [n for n in self.list(include_hidden=True) if is_temporary(n)]
        for n in names:
            self.delete(n)
        return len(names)


def read_bytes(path: str, limit: int | None = None) -> bytes:
    """A whole file by path or URI; `TooLarge` when it holds more than `limit` bytes (read no further)."""
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as fh:
        data = fh.read() if limit is None else fh.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise TooLarge(f"{path} is larger than {limit} bytes")
    return data


def _s3_create_exclusive(fs: pafs.S3FileSystem, bucket: str, key: str, data: bytes) -> bool:
    """PutObject with If-None-Match: * (S3 since 2024, MinIO, moto); pyarrow cannot send the header."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    limit = reach.timeout_s()
    cfg = Config(connect_timeout=limit, read_timeout=limit, retries={"max_attempts": 2, "mode": "standard"})
    client = boto3.client("s3", region_name=getattr(fs, "region", None) or None, config=cfg)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return True
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise OSError(f"s3://{bucket}/{key}: {reason(e)}") from e


def _gcs_create_exclusive(bucket: str, key: str, data: bytes) -> bool:
    """A JSON-API media upload with ifGenerationMatch=0: created only if no live object has that name."""
    emulator = _gcs_emulator()
    base = emulator or "https://storage.googleapis.com"
    query = urllib.parse.urlencode({"uploadType": "media", "name": key, "ifGenerationMatch": "0"})
    url = f"{base}/upload/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o?{query}"
    headers = {"Content-Type": "application/octet-stream"}
    if not emulator:
        import google.auth
        import google.auth.transport.requests

        creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
        creds.refresh(google.auth.transport.requests.Request())
        headers["Authorization"] = f"Bearer {creds.token}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=reach.timeout_s()) as r:
            json.loads(r.read() or b"{}")
        return True
    except urllib.error.HTTPError as e:
        if e.code == 412:
            return False
        raise OSError(f"gs://{bucket}/{key}: HTTP {e.code} {e.reason}") from e
    except (TimeoutError, urllib.error.URLError) as e:
        raise OSError(f"gs://{bucket}/{key}: {reason(e)}") from e


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
    """A Parquet footer's key-value metadata as text (where our shards keep fingerprint and unit). Bytes that are
    not UTF-8 become U+FFFD, so such a value matches nothing we wrote and the shard is redone (never a crash)."""
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (meta.metadata or {}).items()}


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


def refuse_blocked_local(uri: str) -> None:
    """For a local path: raise OSError when its nearest existing ancestor is a file or not writable, which no
    later step could get past. Reads only, and cheap, so a mistyped --out fails before anything heavy (the
    fingerprints import the model library); check_writable's probe, later, stays the proof."""
    if is_uri(uri):
        return
    path = os.path.abspath(uri)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", path)
    if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "Permission denied", path)
