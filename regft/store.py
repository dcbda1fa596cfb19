"""Dataset store: generated images as parquet shards plus a manifest, on any pyarrow filesystem.

Layout (``<store>`` is a local folder or a URI such as ``s3://bucket/prefix``)::

    <store>/<dataset_id>/manifest.json          written last; "complete": true once every shard is in
    <store>/<dataset_id>/shards/shard-00000.parquet   item_id, label, classname, prompt, seed, image
    <store>/<dataset_id>/_tmp/...               shards being written (never read)
    <store>/<dataset_id>/samples.png            a few images per class, for a human to look at

Exactly-once: shard ``k`` holds items ``k*shard_size .. (k+1)*shard_size - 1`` in item_id order, so
its name is a pure function of its content. A shard is serialised in memory, written under
``_tmp/`` and then moved to ``shards/`` (a rename on local disks; on object stores the final
object appears whole or not at all). A name in ``shards/`` therefore always holds a complete shard,
a retried or re-run shard overwrites it with identical content, and nothing is ever duplicated.

Train/val split (``split_of``): an item is in "val" iff the first 8 bytes of sha256(item_id), read
as a big-endian integer and divided by 2**64, are below ``val_fraction``. It depends on the item id
only (not on the shard layout, the reader or the number of workers), so every reader agrees.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from regft import faults
from regft.cli import redact, shorten
from regft.errors import DatasetNotReady
from regft.images import decode_image, encode_png, resize  # noqa: F401 (st.* names)

MANIFEST = "manifest.json"
SAMPLES = "samples.png"
SHARDS_DIR = "shards"
TMP_DIR = "_tmp"
FORMAT = "regft-dataset-v1"
SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet$")
SCHEMA = pa.schema([
    ("item_id", pa.string()),
    ("label", pa.int64()),
    ("classname", pa.string()),
    ("prompt", pa.string()),
    ("seed", pa.int64()),
    ("image", pa.binary()),  # PNG bytes
])
SPLITS = ("train", "val", "all")


# ------------------------------------------------------------------ paths ----

def is_uri(path: str) -> bool:
    return "://" in str(path)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI (s3://, gs://, file://...)."""
    path = str(path)
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), absolute(path)


def absolute(path: str) -> str:
    """A URI as given; a local path made absolute (`~` expanded), so every process agrees."""
    path = str(path)
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts])


def fetch_file(src: str, dest: Path) -> Path | None:
    """Copy file `src` (local path or URI) to local `dest`; None if there is no such file."""
    fs, path = filesystem(src)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        dest.write_bytes(f.read())
    return dest


def dataset_path(store: str, dataset_id: str) -> str:
    """The dataset's location: an absolute local path or a URI (as given)."""
    return join(absolute(store), dataset_id)


def list_datasets(store: str) -> list[str]:
    """The dataset ids (folder names) directly under `store`, sorted; [] when it does not exist."""
    fs, root = filesystem(absolute(store))
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def _exists(fs: pafs.FileSystem, p: str) -> bool:
    return fs.get_file_info(p).type != pafs.FileType.NotFound


STORAGE_CHECK_S = 20.0  # a remote store that has not taken a probe write by then counts as unreachable
ERROR_CHARS = 160  # of a filesystem's error line, quoted in ours (they can be long)
# The write probe for a remote store, run in a child process that is killed at the deadline: an
# object store SDK can hang for minutes inside one call (a silent endpoint, a credential chain
# asking an instance-metadata service that is not there) and no in-process timeout stops it.
# Only pyarrow is imported (fast); the URI comes on stdin, so it is never on a command line.
_REMOTE_PROBE = """
import os, sys, uuid
import pyarrow.fs as pafs
try:
    fs, p = pafs.FileSystem.from_uri(sys.stdin.read())
    if isinstance(fs, pafs.S3FileSystem):  # the same options, answers within seconds or an error
        options = dict(fs.__reduce__()[1][0], connect_timeout=3.0, request_timeout=5.0,
                       retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2))
        fs = pafs.S3FileSystem(**options)
    fs.create_dir(p, recursive=True)
    probe = p.rstrip("/") + "/.regft-write-test-" + uuid.uuid4().hex
    with fs.open_output_stream(probe) as f:
        f.write(b"ok")
    fs.delete_file(probe)
    print("ok", flush=True)
except Exception as e:
    print((str(e).strip().splitlines() or [type(e).__name__])[0], file=sys.stderr, flush=True)
    os._exit(1)
os._exit(0)  # no finalizers: an SDK's shutdown can hang as well
"""
# what the AWS SDK reads credentials from (besides an instance-metadata service)
_AWS_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                       "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


def check_writable(store: str, flag: str = "store (--store / REGFT_STORE)",
                   timeout: float | None = None) -> str | None:
    """None if `store` can be created and written, else a one-line problem naming `flag` and the
    fix. Leaves nothing behind: the folders it had to create are removed again (local paths).
    A remote store (s3://, gs://, ...) is probed in a child process with a deadline of `timeout`
    seconds (default STORAGE_CHECK_S), so an endpoint that does not answer fails in seconds
    instead of hanging."""
    if is_uri(store) and not str(store).startswith("file://"):
        return _check_remote_writable(str(store), flag, STORAGE_CHECK_S if timeout is None else timeout)
    try:
        fs, p = filesystem(store)
        # a check must not leave folders behind (e.g. when another problem stops the run):
        # remember the topmost folder it creates and remove it again
        created, parent = None, p
        while parent and not _exists(fs, parent):
            created, parent = parent, parent.rstrip("/").rpartition("/")[0]
        fs.create_dir(p, recursive=True)
        probe = join(p, f".regft-write-test-{uuid.uuid4().hex}")
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
        if created is not None:
            fs.delete_dir(created)
        return None
    except Exception as e:  # any filesystem error means the same thing to the user
        msg = redact(str(e).splitlines()[0] if str(e) else type(e).__name__)
        return (f"{flag}: {shorten(store)} is not writable (cannot write to it: "
                f"{msg[:ERROR_CHARS]}); pass a writable folder or URI")


def _check_remote_writable(store: str, flag: str, timeout: float) -> str | None:
    try:
        done = subprocess.run([sys.executable, "-c", _REMOTE_PROBE], input=store, text=True,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        if "ok" in str(e.stdout or ""):  # written; only the child's exit hung
            return None
        endpoint = " (endpoint_override=... or AWS_ENDPOINT_URL)" if store.startswith("s3://") else ""
        return (f"{flag}: {shorten(store)} did not take a test write within {timeout:g} s "
                f"(endpoint down or unreachable{_credentials_hint(store)}); check the endpoint"
                f"{endpoint} and the credentials, or pass a local folder")
    if done.returncode == 0:
        return None
    msg = redact((done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1])
    if msg.startswith("Cannot parse URI"):  # a key or secret with '/' or '@' in the userinfo
        msg = "not a valid URI; percent-encode '/' as %2F and '@' as %40 in a key or secret"
    return (f"{flag}: {shorten(store)} is not writable (cannot write to it: {msg[:ERROR_CHARS]}"
            f"{_credentials_hint(store)}); pass a writable folder or URI")


def _credentials_hint(store: str) -> str:
    """For s3:// without any credentials the SDK can find: say so (the likely cause)."""
    if not store.startswith("s3://") or "@" in store.split("?")[0]:
        return ""
    if any(os.environ.get(k) for k in _AWS_CREDENTIAL_ENV):
        return ""
    if (Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")).expanduser().exists()
            or Path(os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")).expanduser().exists()):
        return ""
    return "; no AWS credentials set: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"


# ------------------------------------------------------------------ shards ---

def shard_table(item_ids: list[str], labels: list[int], classnames: list[str], prompts: list[str],
                seeds: list[int], images: list[bytes]) -> pa.Table:
    return pa.table([item_ids, labels, classnames, prompts, seeds, images], schema=SCHEMA)


def write_shard(path: str, index: int, table: pa.Table, fault: dict | None = None) -> dict:
    """Write shard `index` atomically (temp name, then move); return its manifest record.

    A failed write (disk full, lost connection) leaves no shard: the partial temp file is
    deleted (best effort; ``_tmp/`` is never read either way) and the error propagates, so a
    re-run regenerates exactly this shard. `fault` (tests only): {"mode": "disk_full",
    "shard": k, "marker": path} -- the first write of shard k (the marker file makes it once,
    across processes) writes half its bytes, then fails with OSError(ENOSPC) as a full disk does.
    """
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    fs, root = filesystem(path)
    tmp_dir, shard_dir = join(root, TMP_DIR), join(root, SHARDS_DIR)
    fs.create_dir(tmp_dir, recursive=True)
    fs.create_dir(shard_dir, recursive=True)
    # unique temp name: a retried task may race a zombie attempt of the same shard
    tmp = join(tmp_dir, f"{shard_name(index)}.{uuid.uuid4().hex}")
    try:
        with fs.open_output_stream(tmp) as f:
            if faults.disk_full(fault, index):
                f.write(data[: len(data) // 2])
                f.flush()
                raise OSError(errno.ENOSPC, f"No space left on device (injected) writing shard "
                              f"{index}", tmp)
            f.write(data)
        fs.move(tmp, join(shard_dir, shard_name(index)))
    except BaseException:
        try:
            fs.delete_file(tmp)
        except Exception:  # noqa: S110 -- best effort; the original error is the one to report
            pass
        raise
    return {"index": index, "file": f"{SHARDS_DIR}/{shard_name(index)}", "rows": table.num_rows,
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def list_shards(path: str) -> dict[int, str]:
    """Committed shards by index: {index: path inside the filesystem}. Temp files never match."""
    fs, root = filesystem(path)
    sel = pafs.FileSelector(join(root, SHARDS_DIR), allow_not_found=True)
    out = {}
    for info in fs.get_file_info(sel):
        m = SHARD_RE.match(info.base_name)
        if m and info.type == pafs.FileType.File:
            out[int(m.group(1))] = info.path
    return out


def shard_record(path: str, index: int) -> dict | None:
    """Manifest record of a committed shard (reads it whole for the checksum); None if unreadable."""
    fs, root = filesystem(path)
    p = join(root, SHARDS_DIR, shard_name(index))
    try:
        with fs.open_input_file(p) as f:
            data = f.read()
        rows = pq.read_metadata(pa.BufferReader(data)).num_rows
    except Exception:  # missing or corrupt: the caller regenerates it
        return None
    return {"index": index, "file": f"{SHARDS_DIR}/{shard_name(index)}", "rows": rows,
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def shard_item_ids(path: str, index: int) -> list[str] | None:
    """Item ids stored in a committed shard, or None if it cannot be read (corrupt/foreign)."""
    fs, root = filesystem(path)
    try:
        t = pq.read_table(join(root, SHARDS_DIR, shard_name(index)), columns=["item_id"],
                          filesystem=fs)
    except Exception:  # unreadable: treat as missing
        return None
    return t.column("item_id").to_pylist()


def delete_shard(path: str, index: int) -> None:
    fs, root = filesystem(path)
    try:
        fs.delete_file(join(root, SHARDS_DIR, shard_name(index)))
    except FileNotFoundError:
        pass


def delete_dir(path: str) -> None:
    """Delete folder `path` and everything under it (nothing if it does not exist)."""
    fs, root = filesystem(path)
    if _exists(fs, root):
        fs.delete_dir(root)


def clear_tmp(path: str) -> None:
    fs, root = filesystem(path)
    if _exists(fs, join(root, TMP_DIR)):
        fs.delete_dir(join(root, TMP_DIR))


# ------------------------------------------------------------------ claims ---
# One generation per dataset, also when several processes ask for it at once (two searches, two
# `regft.generate` calls, on one machine or several): the generating process holds a claim, the
# others wait for it and then read the finished dataset. The protocol needs nothing but writes,
# deletes and listings that see completed writes (a local disk; S3 / GCS list consistently):
#   1. write <dataset>/_claims/<random>.json;  2. list _claims/;
#   3. only its own file there -> the claim is held; else delete it, wait, go to 1.
# Two claimants cannot both win: whichever listed first listed before the other's write had
# completed, so the later one's listing sees the first's file and it withdraws. (Both may
# withdraw; each then backs off a random time.) The holder rewrites its file every HEARTBEAT_S;
# a waiter that sees a claim file unchanged for STALE_S on its *own* monotonic clock (no clock
# is compared across machines) deletes it as the claim of a crashed process and tries again.
CLAIMS_DIR = "_claims"
HEARTBEAT_S = 5.0
STALE_S = 120.0  # 24 missed heartbeats: a crashed holder, not a slow store
CLAIM_POLL_S = 1.0  # how often a waiter looks at the claims and the manifest


class Claim:
    """A held claim on a dataset path; `release()` (or leaving the `with`) deletes it."""

    def __init__(self, path: str, heartbeat_s: float = HEARTBEAT_S):
        self.path, self.heartbeat_s = path, heartbeat_s
        self.name = f"{uuid.uuid4().hex}.json"
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
        self._beats, self._stop = 0, threading.Event()
        self._thread: threading.Thread | None = None

    def _file(self) -> str:
        return join(filesystem(self.path)[1], CLAIMS_DIR, self.name)

    def write(self) -> None:
        fs, root = filesystem(self.path)
        data = json.dumps({"owner": self.owner, "beat": self._beats}).encode()
        for attempt in range(2):  # the last holder may remove the empty folder between the calls
            fs.create_dir(join(root, CLAIMS_DIR), recursive=True)
            try:
                with fs.open_output_stream(self._file()) as f:
                    f.write(data)
                return
            except FileNotFoundError:
                if attempt:
                    raise

    def start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat_s):
                self._beats += 1
                try:
                    self.write()
                except OSError:  # a store hiccup: the next beat tries again
                    pass
        self._thread = threading.Thread(target=beat, name=f"claim-{self.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        fs, _ = filesystem(self.path)
        try:
            fs.delete_file(self._file())
        except FileNotFoundError:
            pass
        _drop_empty_claims_dir(self.path)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _drop_empty_claims_dir(path: str) -> None:
    """Remove <path>/_claims once no claim is in it, so a finished dataset holds only its own
    files. On a local disk rmdir removes only an empty folder (a claimant that has just written
    keeps its file); an object store has no folders but the marker create_dir may leave."""
    fs, root = filesystem(path)
    folder = join(root, CLAIMS_DIR)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            os.rmdir(folder)
        elif not _claim_files(path):
            fs.delete_dir(folder)
    except OSError:  # not empty, or gone already: the next release tries again
        pass


def _claim_files(path: str) -> dict[str, bytes]:
    """{claim file name: its content} under <path>/_claims (a file deleted meanwhile is left out)."""
    fs, root = filesystem(path)
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(join(root, CLAIMS_DIR), allow_not_found=True)):
        if info.type == pafs.FileType.File and info.base_name.endswith(".json"):
            try:
                with fs.open_input_stream(info.path) as f:
                    out[info.base_name] = f.read()
            except FileNotFoundError:
                continue
    return out


class _StaleWatch:
    """Claims of other processes whose content has not changed for `stale_s` on this clock."""

    def __init__(self, stale_s: float):
        self.stale_s, self.seen = stale_s, {}  # name -> (content, first seen unchanged at)

    def stale(self, claims: dict[str, bytes]) -> list[str]:
        now = time.monotonic()
        self.seen = {n: (c, self.seen[n][1] if n in self.seen and self.seen[n][0] == c else now)
                     for n, c in claims.items()}
        return [n for n, (_, since) in self.seen.items() if now - since >= self.stale_s]


def claim(path: str, done: Callable[[], bool], *, heartbeat_s: float | None = None,
          stale_s: float | None = None, poll_s: float | None = None) -> Claim | None:
    """Wait until either `done()` is true (None: another process finished the work) or this
    process holds the claim on `path` (a heartbeating Claim; release it when the work is done or
    has failed). A claim whose holder stopped heartbeating for `stale_s` is taken over.
    (Timings default to the module's HEARTBEAT_S / STALE_S / CLAIM_POLL_S, read at the call.)"""
    heartbeat_s, stale_s = heartbeat_s or HEARTBEAT_S, stale_s or STALE_S
    poll_s = poll_s or CLAIM_POLL_S
    watch, fs = _StaleWatch(stale_s), filesystem(path)[0]
    while True:
        if done():
            return None
        mine = Claim(path, heartbeat_s)
        mine.write()
        others = {n: c for n, c in _claim_files(path).items() if n != mine.name}
        if not others:
            mine.start_heartbeat()
            return mine
        mine.release()  # someone else holds it (or is trying): wait for them
        for name in watch.stale(others):
            try:
                fs.delete_file(join(filesystem(path)[1], CLAIMS_DIR, name))
            except FileNotFoundError:
                pass
        time.sleep(poll_s * (0.5 + random.random()))  # random: two withdrawn claimants desynchronise


# ---------------------------------------------------------------- manifest ---

def write_bytes_atomic(path: str, name: str, data: bytes) -> None:
    fs, root = filesystem(path)
    fs.create_dir(root, recursive=True)
    tmp = join(root, f".{name}.{uuid.uuid4().hex}.tmp")
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, join(root, name))


def write_manifest(path: str, manifest: dict) -> None:
    write_bytes_atomic(path, MANIFEST, json.dumps(manifest, indent=1, sort_keys=False).encode())


def read_manifest(path: str) -> dict | None:
    """The manifest, or None when there is none yet."""
    fs, root = filesystem(path)
    try:
        with fs.open_input_stream(join(root, MANIFEST)) as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        return None


def load_manifest(dataset_path: str) -> dict:
    """The manifest of a stored dataset; DatasetNotReady when there is none."""
    m = read_manifest(dataset_path)
    if m is None:
        raise DatasetNotReady(
            f"no dataset at {dataset_path!r} ({MANIFEST} missing); create it with "
            "python -m regft.generate TASK --store STORE"
        )
    return m


def _complete_manifest(dataset_path: str) -> dict:
    m = load_manifest(dataset_path)
    if not m.get("complete"):
        done = len(list_shards(dataset_path))
        total = m.get("layout", {}).get("num_shards", "?")
        raise DatasetNotReady(
            f"dataset {dataset_path!r} is incomplete ({done}/{total} shards); re-run the same "
            "python -m regft.generate command to finish it (only missing images are generated)"
        )
    return m


# ------------------------------------------------------------------ splits ---

def split_of(item_id: str, val_fraction: float = 0.1) -> str:
    """'val' iff sha256(item_id)[:8] / 2**64 < val_fraction, else 'train' (see module doc)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    u = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") / 2.0**64
    return "val" if u < val_fraction else "train"


def _check_split(split: str, val_fraction: float) -> None:
    problems = []
    if split not in SPLITS:
        problems.append(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        problems.append(f"val_fraction must be in [0, 1), got {val_fraction}")
    if problems:
        raise ValueError("; ".join(problems))


def _split_mask(item_ids: Iterable[str], split: str, val_fraction: float) -> np.ndarray:
    return np.array([split_of(i, val_fraction) == split for i in item_ids], dtype=bool)


def filter_split(batch: pa.Table, split: str, val_fraction: float) -> pa.Table:
    # module-level so Ray can pickle it by reference
    mask = _split_mask(batch.column("item_id").to_pylist(), split, val_fraction)
    return batch.filter(pa.array(mask))


def shard_paths(dataset_path: str, manifest: dict) -> tuple[pafs.FileSystem, list[str]]:
    """The shards a complete manifest lists, as filesystem paths (never a directory glob)."""
    fs, root = filesystem(dataset_path)
    return fs, [join(root, s["file"]) for s in manifest["shards"]]


def split_shards(dataset_path: str, split: str, val_fraction: float) -> tuple[pafs.FileSystem, list[str]]:
    """The shard files to read for `split` of a complete dataset (rows still to be filtered by
    `filter_split` unless split is 'all'). regft.train.read_ray_dataset reads them with Ray Data."""
    _check_split(split, val_fraction)
    return shard_paths(dataset_path, _complete_manifest(dataset_path))


def split_disk_bytes(dataset_path: str, split: str, val_fraction: float) -> float:
    """About the bytes `split`'s rows take on disk: the shards' sizes x the split's share of the
    items (a split is a hash of the item id, so every shard holds about that share)."""
    fs, paths = split_shards(dataset_path, split, val_fraction)
    total = sum(info.size or 0 for info in fs.get_file_info(paths))
    share = {"all": 1.0, "train": 1.0 - val_fraction, "val": val_fraction}[split]
    return total * share


def read_table(dataset_path: str, split: str = "all", val_fraction: float = 0.1,
               columns: list[str] | None = None) -> pa.Table:
    """All rows of a complete dataset in `split` as one Arrow table, in item_id order."""
    return pa.concat_tables(split_blocks(dataset_path, split, val_fraction, columns, math.inf))


def split_blocks(dataset_path: str, split: str, val_fraction: float, columns: list[str] | None,
                 block_bytes: float) -> Iterator[pa.Table]:
    """The rows of `split` as consecutive tables of about `block_bytes` each (a shard is never
    cut; shards are joined until a block reaches the size), in item_id order, columns
    `columns` plus item_id (None: every column). Read one shard at a time, so memory holds one
    block."""
    fs, paths = split_shards(dataset_path, split, val_fraction)
    cols = None if columns is None else sorted(set(columns) | {"item_id"}, key=SCHEMA.names.index)
    pending: list[pa.Table] = []
    size = 0
    for p in paths:
        table = pq.read_table(p, columns=cols, filesystem=fs)
        if split != "all":
            table = filter_split(table, split, val_fraction)
        pending.append(table)
        size += table.nbytes
        if size >= block_bytes:
            yield pa.concat_tables(pending)
            pending, size = [], 0
    if pending:
        yield pa.concat_tables(pending)


def split_counts(dataset_path: str, val_fraction: float) -> dict[str, int]:
    """{"train": n, "val": n}: a complete dataset's images per split (item ids only are read)."""
    ids = read_table(dataset_path, "all", columns=["item_id"]).column("item_id").to_pylist()
    val = sum(split_of(i, val_fraction) == "val" for i in ids)
    return {"train": len(ids) - val, "val": val}


try:
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # torch is a hard dependency; this only keeps `import regft.store` light
    _TorchDataset = object


class TorchImageDataset(_TorchDataset):
    """A complete stored dataset as a map-style torch Dataset of (transform(PIL image), label).

    The split's rows are held in memory as Arrow buffers (PNG bytes, decoded per item), which
    forked DataLoader workers share without copying.
    """

    def __init__(self, dataset_path: str, split: str = "train",
                 transform: Callable | None = None, val_fraction: float = 0.1):
        self.dataset_path = dataset_path
        self.split = split
        self.transform = transform
        self.manifest = load_manifest(dataset_path)
        self.table = read_table(dataset_path, split, val_fraction,
                                columns=["item_id", "label", "image"])
        self._images = self.table.column("image")
        self.labels = np.asarray(self.table.column("label").to_numpy(), dtype=np.int64)
        self.item_ids = self.table.column("item_id").to_pylist()
        self.classnames = list(self.manifest["task"]["classnames"])

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int):
        image = decode_image(self._images[i].as_py())
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])


# ------------------------------------------------------------------ samples --

def sample_grid(dataset_path: str, manifest: dict, max_classes: int = 8, per_class: int = 4,
                tile: int | None = None):
    """A PIL image: `per_class` images for up to `max_classes` classes spread over the label range,
    one row per class, class name on the left."""
    from PIL import Image, ImageDraw

    counts = manifest["class_counts"]
    names = manifest["task"]["classnames"]
    shard_size = manifest["layout"]["shard_size"]
    n_cls = len(counts)
    labels = sorted({round(i * (n_cls - 1) / max(1, min(max_classes, n_cls) - 1))
                     for i in range(min(max_classes, n_cls))})
    per_class = min(per_class, min(counts[k] for k in labels))
    starts = np.concatenate([[0], np.cumsum(counts)])  # item position of (label, 0)
    wanted = {(k, i) for k in labels for i in range(per_class)}
    shards = sorted({int((starts[k] + i) // shard_size) for k, i in wanted})
    fs, root = filesystem(dataset_path)
    images = {}
    for s in shards:
        t = pq.read_table(join(root, SHARDS_DIR, shard_name(s)), columns=["item_id", "label", "image"],
                          filesystem=fs)
        for item_id, label, img in zip(*(t.column(c).to_pylist() for c in ("item_id", "label", "image"))):
            idx = int(item_id.split("-")[1])
            if (label, idx) in wanted:
                images[(label, idx)] = decode_image(img)
    size = manifest["settings"]["output_size"]
    tile = tile or int(min(max(size, 64), 128))
    margin = 200
    grid = Image.new("RGB", (margin + per_class * tile, len(labels) * tile), "white")
    draw = ImageDraw.Draw(grid)
    for r, k in enumerate(labels):
        draw.text((4, r * tile + tile // 2 - 6), f"{k}: {names[k]}"[:32], fill="black")
        for i in range(per_class):
            if (k, i) in images:
                im = images[(k, i)].resize((tile, tile), Image.NEAREST if size < tile else Image.BICUBIC)
                grid.paste(im, (margin + i * tile, r * tile))
    return grid


def write_sample_grid(dataset_path: str, manifest: dict) -> str:
    buf = io.BytesIO()
    sample_grid(dataset_path, manifest).save(buf, format="PNG")
    write_bytes_atomic(dataset_path, SAMPLES, buf.getvalue())
    return join(dataset_path, SAMPLES)


def write_dataset(path: str, rows: list[tuple], task_name: str, classnames: list[str],
                  shard_size: int = 256) -> str:
    """A complete dataset from in-memory rows (item_id, label, classname, prompt, seed, png),
    in row order: shards, then the manifest. For images that exist already (imports, the
    synthetic sets of tests and benchmarks); generation writes shard by shard instead."""
    records = []
    for index in range(-(-len(rows) // shard_size)):
        chunk = rows[index * shard_size:(index + 1) * shard_size]
        records.append(write_shard(path, index, shard_table(*map(list, zip(*chunk)))))
    counts = [0] * len(classnames)
    for row in rows:
        counts[row[1]] += 1
    write_manifest(path, {
        "format": FORMAT, "dataset_id": path.rstrip("/").rsplit("/", 1)[-1], "complete": True,
        "task": {"name": task_name, "classnames": list(classnames),
                 "generation_classnames": list(classnames)},
        "num_images": len(rows), "class_counts": counts,
        "layout": {"shard_size": shard_size, "num_shards": len(records), "num_items": len(rows)},
        "shards": records,
    })
    return path
