"""The latent cache's files: one folder per fingerprint, fixed-size records keyed by index *and* by a data digest.

A folder (created 0700, files 0600) holds

- ``index.json``: format, fingerprint, record length and a description of what was encoded (written atomically);
- ``data.f32``: float32 records, ``record`` values per index (sparse: only written rows take space);
- ``digest.bin``: 16 bytes per index, the digest of the data the record was encoded from (all zero: no entry);
- ``lock``: ``fcntl.flock`` guard of every read, write, growth and rebuild (short: never held while encoding;
  waiting more than ``lock_timeout`` for it is a ``TimeoutError`` naming the file).

NOTE [Latent cache keys]: a record is served only when its stored digest equals the digest the caller computes
for the item *now* (:func:`file_digest` for a file-backed image: path, size, mtime; :func:`content_digest`
otherwise: the raw bytes). So another dataset at the same path -- a new few-shot draw, an ImageFolder that gained
a file -- gets misses (re-encoded, overwritten), never the first dataset's latents. A write zeroes the digest,
writes the record, then sets the digest, so a writer killed half-way leaves no entry, not a wrong one.

NOTE [Latent cache files]: ``digest.bin``'s size fixes the number of rows n; ``data.f32`` must hold at least n
records (growth extends ``data.f32`` first). A shorter ``data.f32`` (a truncated copy, a full disk) is never
zero-extended and served: the folder is rebuilt with a warning naming the file. Files are never shrunk in place:
a rebuild writes new files and renames them over the old ones, so another process still mapping the old ones keeps
a valid (orphaned) mapping instead of dying of SIGBUS, and notices the new inode at its next call.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
import uuid

import numpy as np

__all__ = ["DIGEST_SIZE", "LatentStore", "content_digest", "default_cache_dir", "file_digest", "private_dir"]

logger = logging.getLogger(__name__)

DIGEST_SIZE = 16
FORMAT = "fusionloader-latents-v2"
ENV_DIR = "FUSIONLOADER_LATENT_CACHE"
_EMPTY = bytes(DIGEST_SIZE)


# -- data identity --------------------------------------------------------------------------------------


def _nonzero(d: bytes) -> bytes:
    # All-zero means "no entry" on disk; a real blake2b digest of zero bytes has probability 2**-128.
    return d if d != _EMPTY else b"\x01" + d[1:]


def file_digest(path: str | os.PathLike) -> bytes:
    """Digest of a file-backed image: its absolute path, size and mtime (one ``stat``, no read)."""
    path = os.path.abspath(os.fspath(path))
    st = os.stat(path)
    key = f"file\0{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    return _nonzero(hashlib.blake2b(key, digest_size=DIGEST_SIZE).digest())


def content_digest(image) -> bytes:
    """Digest of an in-memory image (tensor, ndarray, PIL image, bytes): type, shape, dtype and raw bytes."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    if isinstance(image, (bytes, bytearray, memoryview)):
        h.update(b"bytes\0")
        h.update(image)
        return _nonzero(h.digest())
    if hasattr(image, "tobytes") and hasattr(image, "mode") and hasattr(image, "size"):  # PIL
        h.update(f"pil\0{image.mode}\0{image.size}\0".encode())
        h.update(image.tobytes())
        return _nonzero(h.digest())
    try:
        import torch

        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().contiguous()
            h.update(f"tensor\0{tuple(image.shape)}\0{image.dtype}\0".encode())
            if image.dtype == torch.bfloat16:  # numpy has no bfloat16: hash its bits
                image = image.view(torch.int16)
            h.update(memoryview(image.numpy()).cast("B"))
            return _nonzero(h.digest())
    except ImportError:  # pragma: no cover - torch is a hard dependency of the package
        pass
    arr = np.ascontiguousarray(np.asarray(image))
    if arr.dtype == object:
        raise TypeError(f"cannot digest an image of type {type(image).__name__}")
    h.update(f"array\0{arr.shape}\0{arr.dtype.str}\0".encode())
    h.update(memoryview(arr).cast("B"))
    return _nonzero(h.digest())


# -- folders ------------------------------------------------------------------------------------------


def _make_private_dir(path: str) -> str:
    """Create ``path`` 0700 (parents as needed, themselves 0700 when we create them); existing folders kept as is."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if parent != path and not os.path.isdir(parent):
        _make_private_dir(parent)
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask
    except FileExistsError:
        if not os.path.isdir(path):
            raise NotADirectoryError(f"latent cache path {path!r} exists and is not a folder") from None
    return path


def _check_owned(path: str) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"latent cache root {path!r} is not a plain folder (a symlink?); set {ENV_DIR}")
    if st.st_uid != os.getuid():
        raise PermissionError(f"latent cache root {path!r} belongs to uid {st.st_uid}, not to us; set {ENV_DIR}")
    if st.st_mode & 0o077:
        raise PermissionError(
            f"latent cache root {path!r} is accessible to others (mode {oct(st.st_mode & 0o777)}); "
            f"chmod 700 it or set {ENV_DIR}"
        )


def default_cache_dir() -> str:
    """The node's shared latent cache root for this user, created 0700: ``$FUSIONLOADER_LATENT_CACHE`` when set,
    else ``<tempfile.gettempdir()>/fusionloader-<uid>/latents`` (node-local; ``$TMPDIR`` moves it).

    Every producer of the node (and every later run) opening a cache for the same model, resolution and
    preprocessing lands in the same ``<root>/<fingerprint>/`` folder; entries are keyed by a data digest, so
    sharing is safe across datasets. In the temp root we refuse a folder that is a symlink, belongs to another
    user or is open to others (another user could otherwise plant or read latents).
    """
    root = os.environ.get(ENV_DIR)
    if root:
        return _make_private_dir(os.path.expanduser(root))
    user_root = os.path.join(tempfile.gettempdir(), f"fusionloader-{os.getuid()}")
    try:
        os.mkdir(user_root, 0o700)
    except FileExistsError:
        pass
    _check_owned(user_root)
    return _make_private_dir(os.path.join(user_root, "latents"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def private_dir(root: str | None = None) -> str:
    """A new private temporary folder ``<root>/private-<host>-<pid>-<random>`` (0700).

    Creating one also removes the private folders of dead processes of this host (a producer killed with
    SIGKILL runs no finaliser), so temporary caches do not pile up whatever way their owners exited.
    """
    root = root or default_cache_dir()
    host = socket.gethostname().replace("-", "_")
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            parts = name.split("-")
            if len(parts) == 4 and parts[0] == "private" and parts[1] == host and parts[2].isdigit():
                if int(parts[2]) != os.getpid() and not _pid_alive(int(parts[2])):
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return _make_private_dir(os.path.join(root, f"private-{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"))


# -- the store ----------------------------------------------------------------------------------------------


def _create_file(path: str) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))


class _Damaged(Exception):
    def __init__(self, file: str, why: str):
        super().__init__(f"{file}: {why}")
        self.file, self.why = file, why


class LatentStore:
    """Records of ``record`` float32 values per index in ``folder``, each tagged with a 16-byte data digest.

    ``meta`` (JSON-able, with ``fingerprint``) describes what the records are; a folder whose ``index.json``
    differs is rebuilt. Safe for several threads and processes using one folder at once (see the NOTE blocks).
    """

    def __init__(self, folder: str | os.PathLike, record: int, meta: dict, lock_timeout: float = 120.0):
        if not lock_timeout > 0:
            raise ValueError(f"lock_timeout must be positive seconds, got {lock_timeout!r}")
        self.lock_timeout = float(lock_timeout)
        self.folder = _make_private_dir(os.fspath(folder))
        self.record = int(record)
        self.meta = {"format": FORMAT, "record": self.record, "dtype": "float32", "digest_size": DIGEST_SIZE, **meta}
        self.rebuilt = False  # True when this object found the folder damaged or foreign and rebuilt it
        self._mutex = threading.RLock()  # the mappings below are per object; flock guards the files
        self._mapped_key = None
        self._data = np.zeros((0, self.record), np.float32)
        self._digest = np.zeros((0, DIGEST_SIZE), np.uint8)
        with self.locked():
            self._open_or_create()

    def _file(self, name: str) -> str:
        return os.path.join(self.folder, name)

    @contextlib.contextmanager
    def locked(self):
        """Exclusive flock of the folder (and this object's mutex); held for copies, never for encoding."""
        with self._mutex:
            fd = os.open(self._file("lock"), os.O_CREAT | os.O_RDWR, 0o600)
            try:
                self._acquire(fd)
                yield
            finally:
                os.close(fd)  # releases the flock

    def _acquire(self, fd: int) -> None:
        # Holders keep the lock for a copy (microseconds); one that keeps it for long is stopped or hung
        # (SIGSTOP, a frozen NFS client): fail with the file's name instead of hanging every producer.
        delay, deadline = 0.0005, None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                now = time.monotonic()
                deadline = deadline or now + self.lock_timeout
                if now > deadline:
                    raise TimeoutError(
                        f"latent cache lock {self._file('lock')!r} held by another process for more than "
                        f"{self.lock_timeout:g} s (a stopped or hung process? `fuser` on the file names it)"
                    ) from None
                time.sleep(delay)
                delay = min(2 * delay, 0.02)

    # -- open / validate / rebuild (under the lock) -----------------------------------------------------------

    def _open_or_create(self) -> None:
        try:
            with open(self._file("index.json")) as f:
                found = json.load(f)
        except FileNotFoundError:
            found = None
        except (OSError, ValueError) as e:
            found = {"unreadable": str(e)}
        if found is None:
            self._replace_files(write_index=True)
            return
        if found != self.meta:
            logger.warning("latent cache %s: index.json describes %s, expected %s: rebuilding",
                           self.folder, found, self.meta)  # fmt: skip
            self._rebuild()
            return
        for name in ("data.f32", "digest.bin"):
            if not os.path.exists(self._file(name)):
                logger.warning("latent cache %s: %s is missing: rebuilding", self.folder, name)
                self._rebuild()
                return
        self._refresh()

    def _rebuild(self) -> None:
        self.rebuilt = True
        self._replace_files(write_index=True)

    def _replace_files(self, write_index: bool) -> None:
        # New empty files renamed over the old ones (data first: digest.bin fixes the row count), never a
        # truncation in place: a process that still maps the old files keeps valid pages.
        tag = f".{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        for name in ("data.f32", "digest.bin"):
            _create_file(self._file(name + tag))
            os.replace(self._file(name + tag), self._file(name))
        if write_index:
            tmp = self._file("index.json" + tag)
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(self.meta, f, sort_keys=True)
            os.replace(tmp, self._file("index.json"))
        self._mapped_key = None
        self._refresh()

    def _refresh(self) -> None:
        """Map the files again if another process grew or replaced them; rebuild them if damaged."""
        try:
            self._map()
        except _Damaged as e:
            logger.warning("latent cache %s: %s is damaged (%s): rebuilding (its entries are re-encoded)",
                           self.folder, e.file, e.why)  # fmt: skip
            self._rebuild()

    def _map(self) -> None:
        sd, sg = os.stat(self._file("data.f32")), os.stat(self._file("digest.bin"))
        key = (sd.st_ino, sd.st_size, sg.st_ino, sg.st_size)
        if key == self._mapped_key:
            return
        if sg.st_size % DIGEST_SIZE:
            raise _Damaged(self._file("digest.bin"), f"size {sg.st_size} is not a multiple of {DIGEST_SIZE}")
        n = sg.st_size // DIGEST_SIZE
        need = n * self.record * 4
        if sd.st_size < need:
            raise _Damaged(self._file("data.f32"), f"{sd.st_size} bytes, {need} needed for {n} records")
        if n == 0:
            self._data = np.zeros((0, self.record), np.float32)
            self._digest = np.zeros((0, DIGEST_SIZE), np.uint8)
        else:
            self._data = np.memmap(self._file("data.f32"), np.float32, mode="r+", shape=(n, self.record))
            self._digest = np.memmap(self._file("digest.bin"), np.uint8, mode="r+", shape=(n, DIGEST_SIZE))
        self._mapped_key = key

    def _grow(self, n: int) -> None:
        if n <= len(self._digest):
            return
        new = max(n, 2 * len(self._digest), 1024)  # sparse files: over-allocating costs no disk
        with open(self._file("data.f32"), "r+b") as f:
            if os.fstat(f.fileno()).st_size < new * self.record * 4:
                f.truncate(new * self.record * 4)
        with open(self._file("digest.bin"), "r+b") as f:
            f.truncate(new * DIGEST_SIZE)
        self._map()

    # -- records -----------------------------------------------------------------------------------------------

    @staticmethod
    def _digests(digests) -> np.ndarray:
        arr = np.frombuffer(b"".join(digests), np.uint8).reshape(-1, DIGEST_SIZE) if digests else None
        return arr if arr is not None else np.zeros((0, DIGEST_SIZE), np.uint8)

    def lookup(self, indices, digests, out: np.ndarray | None = None) -> np.ndarray:
        """Boolean hits of ``indices`` whose stored digest equals ``digests``; hits' records copied into ``out``."""
        idx = np.asarray(indices, dtype=np.int64)
        want = self._digests(digests)
        with self.locked():
            self._refresh()
            inside = idx < len(self._digest)
            hit = np.zeros(len(idx), bool)
            hit[inside] = (self._digest[idx[inside]] == want[inside]).all(1)
            if out is not None and hit.any():
                out[hit] = self._data[idx[hit]]
        return hit

    def write(self, indices, digests, records: np.ndarray) -> None:
        """Store ``records`` (len(indices), record) for ``indices``, tagged with ``digests``."""
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) == 0:
            return
        want = self._digests(digests)
        with self.locked():
            self._refresh()
            self._grow(int(idx.max()) + 1)
            self._digest[idx] = 0  # no entry while the record is half written
            self._data[idx] = records
            self._digest[idx] = want

    def count(self) -> int:
        with self.locked():
            self._refresh()
            return int(np.count_nonzero(self._digest.any(1))) if len(self._digest) else 0

    def has(self, index: int) -> bool:
        with self.locked():
            self._refresh()
            return 0 <= index < len(self._digest) and bool(self._digest[index].any())

    def close(self) -> None:
        with self._mutex:
            self._data = np.zeros((0, self.record), np.float32)
            self._digest = np.zeros((0, DIGEST_SIZE), np.uint8)
            self._mapped_key = None
