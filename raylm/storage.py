"""Runs on object storage (``s3://``, ``gs://``) through pyarrow's filesystems, the layer Ray Train uses.

Every machine works on a run through a local *view*: a directory under the
node-local cache holding the parts of the run it reads or writes, and a marker
file naming the run's URI. Code that holds a run directory finds its store
through the marker (``store_of``); a run on a local or shared disk has no
marker, and every ``push``/``pull`` on it does nothing.

Trees that many ranks read (tokenizer, datasets, a stage's final weights) are
pushed with a contents file (each file's size and sha256) and fetched once per
machine into a cache of blobs keyed by their sha256, then hard-linked into the
view: not once per rank, not again after a restart or for the next stage.

Credentials come from each machine's environment or instance identity (pyarrow
reads ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, instance roles, GCP's
default credentials); a URI that carries them is refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import uuid
from collections import deque
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple, TypeVar
from urllib.parse import parse_qs

from raylm.errors import UserError, first_line
from raylm.files import sha256_of

T = TypeVar("T")

SCHEMES = ("s3", "gs", "gcs")
CREDENTIAL_KEYS = ("access_key", "secret_key", "session_token")
MARKER = ".raylm-storage"
CONTENTS = ".contents.json"
"""Beside a pushed tree: relative path -> [size, sha256] of each file, written after them."""
DOWNLOAD_PART = 8 << 20
TRANSFERS = 4
"""Files a process moves to or from a store at once, and ranged reads in flight per large file (S3 serves one
stream far below a link's rate)."""


def is_uri(text: str) -> bool:
    return "://" in str(text)


def cache_root() -> Path:
    """This machine's cache of run views and blobs (``RAYLM_CACHE``, else ``~/.cache/raylm``)."""
    return Path(os.environ.get("RAYLM_CACHE") or Path.home() / ".cache" / "raylm")


class Store:
    """A directory on object storage: ``uri`` keeps its query (``?endpoint_override=...``), ``root`` is its path in ``fs``."""

    def __init__(self, uri: str):
        import pyarrow.fs

        base, _, query = uri.partition("?")
        self.base = base.rstrip("/")
        self.query = query
        self.uri = self.base + (f"?{query}" if query else "")
        self.fs, self.root = pyarrow.fs.FileSystem.from_uri(self.uri)
        self.root = self.root.rstrip("/")

    def __reduce__(self):
        return Store, (self.uri,)

    def child(self, rel: str) -> "Store":
        return Store(f"{self.base}/{rel.strip('/')}" + (f"?{self.query}" if self.query else ""))

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel.strip('/')}" if rel.strip("/") else self.root

    def display(self, rel: str = "") -> str:
        """The URI without its query, as users name the run."""
        return f"{self.base}/{rel.strip('/')}" if rel.strip("/") else self.base

    def is_file(self, rel: str) -> bool:
        import pyarrow.fs

        return self.fs.get_file_info(self.path(rel)).type == pyarrow.fs.FileType.File

    def is_dir(self, rel: str = "") -> bool:
        import pyarrow.fs

        return self.fs.get_file_info(self.path(rel)).type == pyarrow.fs.FileType.Directory

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as stream:
            return stream.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.fs.open_output_stream(self.path(rel)) as stream:
            stream.write(data)

    def files(self, rel: str = "") -> Dict[str, int]:
        """Relative path (below ``rel``) -> size of every file below ``rel``."""
        import pyarrow.fs

        top = self.path(rel)
        selector = pyarrow.fs.FileSelector(top, recursive=True, allow_not_found=True)
        return {info.path[len(top) + 1 :]: info.size for info in self.fs.get_file_info(selector) if info.type == pyarrow.fs.FileType.File}

    @property
    def on_gcs(self) -> bool:
        return self.fs.type_name == "gcs"

    def subdirs(self, rel: str = "") -> list:
        """Names of the directories right below ``rel``."""
        import pyarrow.fs

        if self.on_gcs:
            # pyarrow lists a GCS "directory" only where a marker object names it, and most of raylm's have none
            # (files are written by path): take them from the files below instead.
            return sorted({name.partition("/")[0] for name in self.files(rel) if "/" in name})
        selector = pyarrow.fs.FileSelector(self.path(rel), recursive=False, allow_not_found=True)
        return [info.base_name for info in self.fs.get_file_info(selector) if info.type == pyarrow.fs.FileType.Directory]

    def upload(self, local: Path, rel: str) -> None:
        """A local file or directory to ``rel`` (threads upload a directory's files in parallel)."""
        import pyarrow.fs

        pyarrow.fs.copy_files(str(local), self.path(rel), source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=self.fs, use_threads=True)

    def download(self, rel: str, local: Path) -> int:
        """One file to ``local`` (via a temporary name, so a reader never sees half of it); its size."""
        return self.download_hashed(rel, local)[0]

    def download_hashed(self, rel: str, local: Path) -> Tuple[int, str]:
        """``download``, the bytes hashed on their way to the file: (size, sha256), no second read to verify it.

        A large file comes as ranged reads, ``TRANSFERS`` in flight (one S3 stream is far slower than the
        link), written and hashed in order; at most ``TRANSFERS + 1`` parts are held in memory.
        """
        from concurrent.futures import ThreadPoolExecutor

        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.part")
        digest = hashlib.sha256()
        with self.fs.open_input_file(self.path(rel)) as source, open(partial, "wb") as out, \
                ThreadPoolExecutor(TRANSFERS, thread_name_prefix="raylm-part") as pool:
            size = source.size()
            offsets = iter(range(0, size, DOWNLOAD_PART))
            in_flight = deque(pool.submit(source.read_at, DOWNLOAD_PART, offset) for offset in islice(offsets, TRANSFERS))
            while in_flight:
                part = in_flight.popleft().result()
                for offset in islice(offsets, 1):
                    in_flight.append(pool.submit(source.read_at, DOWNLOAD_PART, offset))
                digest.update(part)
                out.write(part)
        os.replace(partial, local)
        return size, digest.hexdigest()

    def delete_file(self, rel: str) -> None:
        self.fs.delete_file(self.path(rel))

    def delete_dir(self, rel: str) -> None:
        self.fs.delete_dir(self.path(rel))


def download_many(store: Store, wanted: Dict[str, Path]) -> Dict[str, Tuple[int, str]]:
    """Every file ``wanted`` names (store-relative path -> local path), ``TRANSFERS`` at a time; their (size, sha256)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(TRANSFERS, thread_name_prefix="raylm-download") as pool:
        done = {rel: pool.submit(store.download_hashed, rel, local) for rel, local in wanted.items()}
        return {rel: future.result() for rel, future in done.items()}


class Uploads:
    """Files going up to ``store`` in the background, a few at a time."""

    def __init__(self, store: Store):
        from concurrent.futures import ThreadPoolExecutor

        self.store = store
        self._pool = ThreadPoolExecutor(TRANSFERS, thread_name_prefix="raylm-upload")
        self._started: Dict[str, object] = {}

    def start(self, local: Path, rel: str) -> None:
        self._started[rel] = self._pool.submit(self.store.upload, local, rel)

    def wait(self) -> None:
        """Return once every upload is done; the first failure raises."""
        try:
            for upload in self._started.values():
                upload.result()
        finally:
            self._pool.shutdown(cancel_futures=True)


def check_uri(uri: str, key: str = "runs_dir") -> None:
    """The scheme and the query of a store URI, without touching the network."""
    scheme = uri.partition("://")[0].lower()
    if scheme not in SCHEMES:
        raise UserError(f"{key}={uri}: raylm stores runs on a local or shared path, s3:// or gs://, not {scheme}://; "
                        f"use one of those")
    if not uri.partition("://")[2].partition("?")[0].strip("/"):
        raise UserError(f"{key}={uri}: names no bucket; use {scheme}://BUCKET/PREFIX")
    given = parse_qs(uri.partition("?")[2])
    if any(k in given for k in CREDENTIAL_KEYS):
        raise UserError(f"{key}={uri.partition('?')[0]}?...: credentials do not belong in a URI (it is saved in configs and logs); "
                        "remove them and export AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or use the machine's identity)")


def open_store(uri: str, key: str = "runs_dir") -> Store:
    """The store ``uri`` names (pyarrow may ask the network for the bucket's region): one line naming ``key`` and the fix otherwise."""
    check_uri(uri, key)
    try:
        return Store(uri)
    except Exception as err:  # pyarrow's ArrowInvalid for an unknown query parameter or a malformed URI
        example = ("gs://bucket/prefix, or ?endpoint_override=host:port&scheme=http for a GCS-compatible server" if uri.lower().startswith(("gs://", "gcs://"))
                   else "S3-compatible stores: s3://bucket/prefix?endpoint_override=http://host:port")
        raise UserError(f"{key}={uri}: {first_line(err)}; fix the URI ({example})") from None


PROBE_RETRY_S = 20
"""How long the GCS client retries the probe (its own default is 15 minutes: an unreachable endpoint would hang the launch)."""

PROBE_ATTEMPTS = 3
"""Attempts per request of the S3 probe, with the AWS SDK's standard backoff (tenths of a second). Arrow's default
strategy backed off for seconds: an unreachable endpoint took ~6 s to report."""


def _probing(store: Store) -> Store:
    """``store`` with the probe's retries: bounded on GCS, brief on S3."""
    import pyarrow.fs

    if store.on_gcs and "retry_limit_seconds" not in store.query:
        return Store(f"{store.uri}{'&' if store.query else '?'}retry_limit_seconds={PROBE_RETRY_S}")
    if store.fs.type_name == "s3":  # S3 URIs take no retry option: the same options (what pickling keeps), another strategy
        _, (options,) = store.fs.__reduce__()
        probing = Store(store.uri)
        probing.fs = pyarrow.fs.S3FileSystem(**options, retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=PROBE_ATTEMPTS))
        return probing
    return store


def _through_probe(store: Store, key: str, doing: str, action: Callable[[Store], T]) -> T:
    """``action`` on ``store`` with the probe's retries; what pyarrow raises (an unreachable endpoint, a missing bucket,
    refused credentials) becomes one line naming ``key`` and the fix."""
    try:
        return action(_probing(store))
    except Exception as err:  # OSError from pyarrow with the store's own message
        raise UserError(f"{key}={store.display()}: cannot {doing} there ({_store_problem(err, store)})") from None


def check_writable(store: Store, key: str = "runs_dir") -> None:
    """Write and delete a probe object: an unreachable endpoint, a missing bucket or refused credentials stop here."""
    probe = f".raylm-probe-{uuid.uuid4().hex[:12]}"

    def write_and_delete(probing: Store) -> None:
        probing.write_bytes(probe, b"")
        probing.fs.delete_file(probing.path(probe))

    _through_probe(store, key, "write", write_and_delete)


def looked_up(store: Store, key: str, read: Callable[[Store], T]) -> T:
    """``read(store)``, failing as ``check_writable`` does: for a URI the user gave to read (a run to resume,
    --runs-dir to list)."""
    return _through_probe(store, key, "read", read)


AWS_CREDENTIAL_SOURCES = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                          "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
"""Environment variables through which the AWS SDK finds credentials (besides its files and the instance's role)."""


def _store_problem(err: Exception, store: Store) -> str:
    lowered = str(err).lower()
    # GCS answers an upload into a missing bucket with a bare 404, and the probe's own name cannot be missing.
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered or "not found" in lowered and "bucket" in lowered \
            or store.on_gcs and "not_found" in lowered:
        return "the bucket does not exist; create it first"
    if store.on_gcs and "oauth2 access token" in lowered:  # no key file, no metadata server: the client never sent the request
        return ("this machine has no Google Cloud credentials: set GOOGLE_APPLICATION_CREDENTIALS to a service account key file, "
                "or run where the machine's service account has access")
    if any(s in lowered for s in ("invalidaccesskeyid", "invalid_access_key_id", "signaturedoesnotmatch", "signature_does_not_match",
                                  "accessdenied", "access_denied", "access denied", "forbidden")):
        return ("the store refused this machine's credentials; export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for this store "
                "(or grant the machine's role access)")
    if any(s in lowered for s in ("connect", "resolve", "timeout", "timed out", "unreachable", "refused")):
        return "the endpoint cannot be reached; check the host, the port and ?endpoint_override"
    if store.base.startswith("s3://") and not any(os.environ.get(name) for name in AWS_CREDENTIAL_SOURCES) \
            and not (Path.home() / ".aws" / "credentials").is_file():
        return (f"{first_line(err)}; this machine has no AWS credentials: export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or give the machine a role with access)")
    return first_line(err)


# ---------------------------------------------------------------- run views
def view_of(store: Store) -> Path:
    """This machine's local view of the run at ``store``, with its marker."""
    view = cache_root() / "runs" / hashlib.sha256(store.uri.encode()).hexdigest()[:16] / Path(store.root).name
    view.mkdir(parents=True, exist_ok=True)
    marker = view / MARKER
    if not marker.is_file():
        _write_whole(marker, store.uri)  # the node's other ranks may read it at once: never an empty file
    return view


def _write_whole(path: Path, text: str) -> None:
    """``path`` holds ``text`` or what it held before, never a part of it (a temporary file renamed over it)."""
    scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    scratch.write_text(text)
    os.replace(scratch, path)


def store_of(run_dir: Path) -> Optional[Store]:
    """The store a run view mirrors; None for a run on a local or shared disk."""
    marker = Path(run_dir) / MARKER
    return Store(marker.read_text().strip()) if marker.is_file() else None


def where(run_dir: Path) -> str:
    """How to name the run to the user: its URI, or its directory."""
    store = store_of(run_dir)
    return store.display() if store else str(run_dir)


def push(run_dir: Path, rel: str) -> None:
    """Upload ``run_dir/rel`` (a file, or a directory without its symbolic links) to the run's store, if it has one."""
    store = store_of(run_dir)
    local = run_dir / rel
    if store is None or not local.exists():
        return
    if local.is_dir():
        for child in local.iterdir():
            if not child.is_symlink():
                push(run_dir, f"{rel}/{child.name}")
    else:
        store.upload(local, rel)


def pull(run_dir: Path, rel: str) -> bool:
    """Download ``rel`` (a file or every file below a directory) from the run's store; whether it exists there."""
    store = store_of(run_dir)
    if store is None:
        return (run_dir / rel).exists()
    if store.is_file(rel):
        store.download(rel, run_dir / rel)
        return True
    found = store.files(rel)
    for name in found:
        store.download(f"{rel}/{name}", run_dir / rel / name)
    return bool(found)


def exists(run_dir: Path, rel: str) -> bool:
    """Whether ``rel`` is a file of the run, in its store when it has one."""
    store = store_of(run_dir)
    return store.is_file(rel) if store is not None else (run_dir / rel).is_file()



def push_tree(run_dir: Path, rel: str) -> None:
    """Upload a directory many machines will read, its contents file last (a reader never sees a partial tree)."""
    store = store_of(run_dir)
    if store is None:
        return
    local = run_dir / rel
    contents = _local_contents(local)
    known = _remote_contents(store, rel)
    if known != contents:
        store.upload(local, rel)
        store.write_bytes(f"{rel}/{CONTENTS}", json.dumps(contents, sort_keys=True).encode())


def _local_contents(local: Path) -> Dict[str, list]:
    """relative path -> [size, sha256] of every file of ``local``. A driver pushes a stage's inputs at every stage
    (and every relaunch): a file whose size and modification time are those of its last hashing keeps that hash
    (recorded per machine under ``RAYLM_CACHE``), so gigabytes of prepared data are not read again each time."""
    record = cache_root() / "hashes" / f"{hashlib.sha256(str(local.resolve()).encode()).hexdigest()[:32]}.json"
    try:
        earlier = json.loads(record.read_text())
    except (OSError, ValueError):
        earlier = {}
    contents, seen = {}, {}
    for path in sorted(p for p in local.rglob("*") if p.is_file() and p.name != CONTENTS):
        name, stat = path.relative_to(local).as_posix(), path.stat()
        size_and_time = [stat.st_size, stat.st_mtime_ns]
        previous = earlier.get(name)
        digest = previous[2] if isinstance(previous, list) and previous[:2] == size_and_time else sha256_of(path)
        contents[name], seen[name] = [stat.st_size, digest], [*size_and_time, digest]
    if seen != earlier:
        record.parent.mkdir(parents=True, exist_ok=True)
        _write_whole(record, json.dumps(seen))
    return contents


def _remote_contents(store: Store, rel: str) -> Optional[Dict[str, list]]:
    try:
        return json.loads(store.read_bytes(f"{rel}/{CONTENTS}"))
    except (OSError, ValueError):
        return None


@contextmanager
def _machine_lock(name: str) -> Iterator[None]:
    """One process per machine at a time (ranks of one node share one fetch)."""
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_tree(run_dir: Path, rel: str) -> int:
    """Make ``run_dir/rel`` hold the tree ``push_tree`` uploaded; bytes downloaded by this call (0 when this
    machine already holds every file, from any run). A no-op for a run on a shared disk."""
    store = store_of(run_dir)
    if store is None:
        return 0
    contents = _remote_contents(store, rel)
    if contents is None:
        raise UserError(f"{store.display(rel)} is missing or incomplete (no {CONTENTS}); the run's storage lost it, "
                        "start the stage again with 'raylm resume'")
    blobs = cache_root() / "blobs"

    def blob_of(sha256: str) -> Path:
        """This machine's copy of a file, by its content."""
        return blobs / sha256[:2] / sha256

    with _machine_lock("blobs"):  # one fetch at a time per machine: trees share blobs (a tokenizer in two of them)
        missing: Dict[Path, str] = {}
        for name, (size, sha256) in contents.items():
            blob = blob_of(sha256)
            target = run_dir / rel / name
            if not blob.is_file() or blob.stat().st_size != size:
                if target.is_file() and target.stat().st_size == size and sha256_of(target) == sha256:
                    blob.parent.mkdir(parents=True, exist_ok=True)
                    os.link(target, blob)  # the driver's own machine: it wrote the file itself
                else:
                    missing.setdefault(blob, f"{rel}/{name}")
        downloaded = download_many(store, {name: blob for blob, name in missing.items()})
        for blob, name in missing.items():
            if downloaded[name][1] != blob.name:
                blob.unlink()
                raise RuntimeError(f"{store.display(name)} fails its sha256 check after download")
        for name, (_, sha256) in contents.items():
            blob = blob_of(sha256)
            target = run_dir / rel / name
            if target.exists() and os.path.samefile(target, blob):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            os.link(blob, target)
    return sum(size for size, _ in downloaded.values())


def fetch_files(store: Store, rel: str, local: Path, wanted: Callable[[str], bool], sizes: Dict[str, int]) -> Dict[str, Tuple[int, str]]:
    """The files below ``rel`` that ``wanted`` picks, into ``local`` (kept when already there with the size
    ``sizes`` gives); name -> (size, sha256) of those this call downloaded."""
    with _machine_lock(store.uri + "/" + rel):
        missing = {name: local / name for name, size in sizes.items()
                   if wanted(name) and not ((local / name).is_file() and (local / name).stat().st_size == size)}
        downloaded = download_many(store, {f"{rel}/{name}": target for name, target in missing.items()})
    return {name: downloaded[f"{rel}/{name}"] for name in missing}
