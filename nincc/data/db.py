"""Key-value databases of Caffe records: LMDB (``lmdb``) and LevelDB (``plyvel``).

Readers walk the keys in byte order from the first, as Caffe's cursors do, and wrap to the first
record at the end. Readers never write to the database: LMDB opens read-only without a lock file;
LevelDB (which writes a log even when only reading) is opened through a private shadow directory
that links the immutable table files and copies the small metadata files. Writers build the
database in a temporary sibling directory and rename it into place when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
import weakref
from collections.abc import Iterator

from ..errors import DataError

BACKENDS = ("LMDB", "LEVELDB")
_MAKE_HINT = (
    "create it with `python tools/make_lmdb.py <images> {path}` (or tools/cifar10_to_lmdb.py, "
    "tools/mnist_to_lmdb.py, tools/digits_to_lmdb.py)"
)


def backend_name(name: str) -> str:
    """Normalise a backend name ('lmdb', 'LevelDB', ...) to LMDB or LEVELDB."""
    b = name.upper()
    if b not in BACKENDS:
        raise DataError(f"unknown database backend '{name}'; use lmdb or leveldb")
    return b


def _lmdb():
    try:
        import lmdb
    except ImportError:
        raise DataError("LMDB databases need the lmdb package: pip install 'nincc[data]'") from None
    return lmdb


def _plyvel():
    try:
        import plyvel
    except ImportError:
        raise DataError(
            "LevelDB databases need the plyvel package: pip install 'nincc[leveldb]'"
        ) from None
    return plyvel


def missing_source(where: str, path: str, backend: str) -> DataError:
    """The error for a data source that is not there, saying how to make one."""
    return DataError(
        f"{where}: {backend} database '{path}' not found (relative paths are read from the "
        f"working directory {os.getcwd()}); " + _MAKE_HINT.format(path=path)
    )


# ---------------------------------------------------------------- reading


class Cursor:
    """Records of a database in key order; ``next()`` wraps to the first record at the end."""

    def __init__(self, path: str, backend: str, where: str = "data source"):
        self.path, self.backend, self.where = path, backend_name(backend), where
        if not os.path.exists(path):
            raise missing_source(where, path, self.backend)
        self._closers: list = []
        if self.backend == "LMDB":
            self._open_lmdb()
        else:
            self._open_leveldb()
        if not self._first():
            self.close()
            raise DataError(
                f"{where}: {self.backend} database '{path}' is empty; "
                + _MAKE_HINT.format(path=path)
            )

    def _open_lmdb(self) -> None:
        env = _shared_lmdb_env(self.path, self.where)
        txn = env.begin(buffers=False)
        cur = txn.cursor()
        self._closers = [txn.abort, lambda: _release_lmdb_env(self.path)]
        self._first = cur.first
        self._advance = cur.next
        self._item = lambda: (cur.key(), cur.value())

    def _open_leveldb(self) -> None:
        plyvel = _plyvel()
        shadow = _leveldb_shadow(self.path)
        try:
            db = plyvel.DB(shadow, create_if_missing=False)
        except Exception as e:  # plyvel.Error and IOError subclasses
            shutil.rmtree(shadow, ignore_errors=True)
            raise DataError(
                f"{self.where}: cannot open LevelDB database '{self.path}': {e}"
            ) from None
        fin = weakref.finalize(self, _close_leveldb, db, shadow)
        self._closers = [fin]
        state: dict = {"it": None, "item": None}

        def first() -> bool:
            state["it"] = db.iterator()
            return advance()

        def advance() -> bool:
            state["item"] = next(state["it"], None)
            return state["item"] is not None

        self._first, self._advance = first, advance
        self._item = lambda: state["item"]

    def next(self) -> tuple[bytes, bytes]:
        """The current record (key, value), then move on (to the first after the last)."""
        item = self._item()
        if not self._advance():
            self._first()
        return item

    def close(self) -> None:
        for c in self._closers:
            c()
        self._closers = []

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The lmdb package refuses to open one environment twice in a process, so readers share one
# read-only environment per database, counted and closed with its last reader.
_LMDB_ENVS: dict[str, list] = {}
_LMDB_LOCK = threading.Lock()


def _shared_lmdb_env(path: str, where: str):
    key = os.path.realpath(path)
    with _LMDB_LOCK:
        entry = _LMDB_ENVS.get(key)
        if entry is None:
            lmdb = _lmdb()
            try:
                env = lmdb.open(
                    path,
                    readonly=True,
                    lock=False,
                    readahead=False,
                    subdir=os.path.isdir(path),
                    max_readers=126,
                )
            except lmdb.Error as e:
                raise DataError(f"{where}: cannot open LMDB database '{path}': {e}") from None
            entry = _LMDB_ENVS[key] = [env, 0]
        entry[1] += 1
        return entry[0]


def _release_lmdb_env(path: str) -> None:
    key = os.path.realpath(path)
    with _LMDB_LOCK:
        entry = _LMDB_ENVS.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            entry[0].close()
            del _LMDB_ENVS[key]


def _leveldb_shadow(path: str) -> str:
    """A private directory where LevelDB may write, its table files linked to the original's."""
    src = os.path.abspath(path)
    if not os.path.isfile(os.path.join(src, "CURRENT")):
        raise DataError(f"'{path}' is not a LevelDB database (no CURRENT file)")
    shadow = tempfile.mkdtemp(prefix="nincc-leveldb-")
    for name in os.listdir(src):
        if name in ("LOCK", "LOG", "LOG.old"):
            continue
        if name.endswith((".ldb", ".sst")):
            os.symlink(os.path.join(src, name), os.path.join(shadow, name))
        else:
            shutil.copyfile(os.path.join(src, name), os.path.join(shadow, name))
    return shadow


def _close_leveldb(db, shadow: str) -> None:
    db.close()
    shutil.rmtree(shadow, ignore_errors=True)


def iter_records(path: str, backend: str, where: str = "database") -> Iterator[tuple[bytes, bytes]]:
    """Every record of a database once, in key order."""
    cur = Cursor(path, backend, where)
    try:
        first_key = None
        while True:
            key, value = cur.next()
            if key == first_key:
                return
            if first_key is None:
                first_key = key
            yield key, value
    finally:
        cur.close()


# ---------------------------------------------------------------- writing


class Writer:
    """Writes a new database atomically: into a temporary sibling, renamed on ``commit()``.

    Use as a context manager; an exception discards the partial database. An existing
    database at ``path`` is an error unless ``overwrite`` is set.
    """

    BATCH = 1000

    def __init__(self, path: str, backend: str = "LMDB", overwrite: bool = False):
        self.path, self.backend = os.path.abspath(path), backend_name(backend)
        if os.path.exists(self.path) and not overwrite:
            raise DataError(f"output '{path}' already exists (pass --overwrite to replace it)")
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        self.tmp = os.path.join(parent, f".{os.path.basename(self.path)}.tmp-{tag}")
        self.count = 0
        self._pending: list[tuple[bytes, bytes]] = []
        if self.backend == "LMDB":
            self._env = _lmdb().open(self.tmp, map_size=1 << 28, subdir=True, meminit=False)
        else:
            self._db = _plyvel().DB(self.tmp, create_if_missing=True, error_if_exists=True)

    def put(self, key: bytes | str, value: bytes) -> None:
        k = key.encode() if isinstance(key, str) else key
        self._pending.append((k, value))
        self.count += 1
        if len(self._pending) >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        if self.backend == "LMDB":
            lmdb = _lmdb()
            while True:
                try:
                    with self._env.begin(write=True) as txn:
                        for k, v in self._pending:
                            txn.put(k, v)
                    break
                except lmdb.MapFullError:
                    self._env.set_mapsize(self._env.info()["map_size"] * 2)
        else:
            with self._db.write_batch() as wb:
                for k, v in self._pending:
                    wb.put(k, v)
        self._pending = []

    def _close(self) -> None:
        if self.backend == "LMDB":
            self._env.close()
        else:
            self._db.close()

    def commit(self) -> None:
        """Write what is pending and move the finished database to its path."""
        self._flush()
        self._close()
        replace_path(self.tmp, self.path)

    def abort(self) -> None:
        self._pending = []
        self._close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def replace_path(tmp: str, final: str) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first, then deleted."""
    old = None
    if os.path.lexists(final):
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)


def write_file_atomic(path: str, data: bytes) -> None:
    """Write bytes to a temporary sibling file and rename it over ``path``."""
    final = os.path.abspath(path)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = os.path.join(
        os.path.dirname(final), f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex[:8]}"
    )
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
