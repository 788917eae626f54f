"""Shards that cannot be read: found before training (local files) or while streaming, named, then fatal or skipped.

A partial copy or a storage hiccup truncates one shard in hundreds; pyarrow and tarfile then fail with an error that
names no file, and `tarfile`'s stream mode can even end a cut archive early without any error. Two guards:

- `find_bad_shards` checks local parquet and webdataset ``.tar`` shards before any training, cheaply: the parquet
  magic bytes and footer (and that every column chunk lies inside the file), the tar headers (every member's data
  inside the file, then only the zeros of the end-of-archive blocks). `modeling_mae.data` stops with one line listing
  every bad shard, or, with ``--skip_bad_shards``, leaves them out and counts them.
- `ShardGuard` wraps the dataset builder's per-shard generator (`datasets` calls it once per shard, in whichever
  process and worker reads that shard): a read that fails is retried, from the record where it stopped, with
  backoff, and a tar shard must end with its end-of-archive blocks (`datasets` reads tars with `tarfile`'s stream
  mode, which ends an archive cut between two members silently). A shard that still fails stops the stream with a
  `ShardReadError` naming it or, with ``--skip_bad_shards``, is cut there (the records read before are kept), logged
  and recorded in `ShardGuard.skipped` for the loader to count. A shard that is corrupt stays corrupt, so every
  reader of it (another worker, a resumed run) cuts it at the same record: the disjoint split between processes and
  the exact resume position are unaffected.

Only errors in reading or decoding a file's bytes mark a shard bad (`READ_ERRORS`; a lost connection is one: `datasets`
turns it into a `ConnectionError`). A resource that ran out (memory, disk space, file handles: `is_resource_error`),
an interrupt or an error of the code passes through at once, with its own message: it says nothing about the file. A
parquet shard whose footer says it holds 0 rows is read as empty (`datasets` cannot read one: its reader asks for
batches of 0 rows).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import pathlib
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import ArrowBasedBuilder, DatasetBuilder
from datasets.utils.file_utils import xopen

from ..errors import UsageError, describe

logger = logging.getLogger(__name__)

SHARD_READ_ATTEMPTS = 3
SHARD_RETRY_DELAY_S = 2.0  # before the 2nd attempt; doubled before each later one
PARQUET_MAGIC = b"PAR1"
SHARD_SUFFIXES = (".parquet", ".tar")
_GIVEN_UP: set[str] = set()  # shards this process gave up on (each DataLoader worker has its own copy)
MAX_TAR_PADDING = 1 << 20  # zeros after a tar's last member: 2 end blocks + record padding (10 KiB; GNU tar -b: more)
READ_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError, pa.ArrowException, zlib.error)  # what readers raise
RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE, errno.ENFILE})


class ShardReadError(UsageError):
    """A shard that could not be read, even after retries; the message names it."""


def is_resource_error(error: BaseException) -> bool:
    """Memory, disk space or file handles ran out (an `ArrowMemoryError` is a `MemoryError` too): the machine's
    problem, not the file's."""
    return isinstance(error, MemoryError) or (isinstance(error, OSError) and error.errno in RESOURCE_ERRNOS)


@dataclass(frozen=True)
class ShardScan:
    """What a look at a local shard's structure found, without reading its records."""

    records: int | None  # samples in the shard (None: not a parquet or tar shard, or unreadable)
    problem: str | None  # why the shard is unreadable; None when it looks whole
    columns: frozenset[str] | None = None  # a parquet shard's columns (its schema's); None for a tar


def scan_shard(path: str | pathlib.Path) -> ShardScan:
    """Records and problem of a local shard; cached until the file changes (size or modification time)."""
    stat = pathlib.Path(path).stat()
    return _scan(str(path), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _scan(path: str, size: int, mtime_ns: int) -> ShardScan:
    suffix = pathlib.Path(path).suffix.lower()
    if suffix == ".parquet":
        return _scan_parquet(pathlib.Path(path), size)
    if suffix == ".tar":
        return _scan_tar(pathlib.Path(path), size)
    return ShardScan(records=None, problem=None)  # not a shard format this module knows


def _scan_parquet(path: pathlib.Path, size: int) -> ShardScan:
    with path.open("rb") as file:
        head = file.read(len(PARQUET_MAGIC))
        file.seek(max(size - len(PARQUET_MAGIC), 0))
        tail = file.read(len(PARQUET_MAGIC))
    if size < 2 * len(PARQUET_MAGIC) or head != PARQUET_MAGIC:
        return ShardScan(None, "not a parquet file (no PAR1 header)")
    if tail != PARQUET_MAGIC:
        return ShardScan(None, "truncated parquet file (no PAR1 footer)")
    try:
        metadata = pq.read_metadata(path)
    except (pa.ArrowException, OSError) as error:
        return ShardScan(None, f"unreadable parquet footer ({describe(error)})")
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for column in range(row_group.num_columns):
            chunk = row_group.column(column)
            start = chunk.dictionary_page_offset or chunk.data_page_offset
            if start + chunk.total_compressed_size > size:
                return ShardScan(None, f"parquet row group {group} ends past the end of the file")
    return ShardScan(metadata.num_rows, None, frozenset(metadata.schema.to_arrow_schema().names))


def _scan_tar(path: pathlib.Path, size: int) -> ShardScan:
    keys = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.offset_data + member.size > size:
                    return ShardScan(None, f"truncated tar file ({member.name} is cut off)")
                if member.isfile():
                    keys.add(member.name.split(".", 1)[0])
            end = tar.offset  # where tarfile stopped: an end-of-archive block, or garbage / the end of a cut file
    except tarfile.TarError as error:
        return ShardScan(None, f"unreadable tar file ({describe(error)})")
    if size - end > MAX_TAR_PADDING:
        return ShardScan(None, f"corrupt tar file (the archive stops at byte {end} of {size})")
    with path.open("rb") as file:
        file.seek(end)
        rest = file.read()  # the end-of-archive blocks and the padding of the last record, all zeros
    if rest.strip(tarfile.NUL):
        return ShardScan(None, f"corrupt tar file (no valid header at byte {end})")
    if len(rest) < 2 * tarfile.BLOCKSIZE:
        return ShardScan(None, f"truncated tar file (cut at byte {size}, no end-of-archive blocks)")
    return ShardScan(len(keys), None)


def find_bad_shards(files: Iterable[str]) -> dict[str, str]:
    """`{path: problem}` of the local parquet and tar shards among `files` that cannot be read whole."""
    shards = [file for file in files if file.lower().endswith(SHARD_SUFFIXES) and pathlib.Path(file).is_file()]
    scans = {file: scan_shard(file) for file in shards}  # not an image folder's files: they are no shards
    return {file: scan.problem for file, scan in scans.items() if scan.problem is not None}


def local_parquet_columns(file: str) -> frozenset[str] | None:
    """The columns of a local parquet shard, from the start-up check's cached scan; None for any other file."""
    return scan_shard(file).columns if file.lower().endswith(".parquet") and pathlib.Path(file).is_file() else None


# --- While streaming ---------------------------------------------------------------------------------------------


def _num_records(item: Any) -> int:
    return item.num_rows if isinstance(item, pa.Table) else 1  # Arrow builders yield tables, the others examples


def _after(items: Iterator[tuple[Any, Any]], done: int) -> Iterator[tuple[Any, Any]]:
    """`items` without their first `done` records (a table is cut where needed)."""
    for key, item in items:
        size = _num_records(item)
        if done >= size:
            done -= size
            continue
        yield key, item.slice(done) if done else item
        done = 0


@functools.cache  # once per shard and process: it is asked only after a failed read
def _holds_no_rows(name: str) -> bool:
    """Whether a parquet shard's footer (local or remote) says it has 0 rows."""
    if not name.endswith(".parquet"):
        return False
    try:
        with xopen(name, "rb") as file:
            return pq.read_metadata(file).num_rows == 0
    except READ_ERRORS:
        return False  # the footer cannot be read either: the shard is bad, as the failed read said


def _check_tar_end(name: str) -> None:
    """Raise if a tar shard (local or remote) does not end with the two zero blocks that close an archive."""
    if not name.endswith(".tar"):
        return
    with xopen(name, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(max(size - 2 * tarfile.BLOCKSIZE, 0))
        if file.read() != tarfile.NUL * (2 * tarfile.BLOCKSIZE):
            raise tarfile.ReadError(f"the archive is cut short ({size} bytes, no end-of-archive blocks)")


def shard_name(shard: dict[str, Any]) -> str:
    """The file a shard's generator arguments read (e.g. parquet's ``files``, webdataset's ``tar_paths``)."""
    for value in shard.values():
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0] if len(value) == 1 else f"{value[0]} (and {len(value) - 1} more files)"
    return repr(shard)


@dataclass
class ShardGuard:
    """A builder's per-shard generator with retries; then a shard that still fails is fatal or skipped (see module).

    A shard given up once in this process is read without retries (and without warnings) when it comes again (the
    next epoch, another pass, another loader of the split): it fails at the same record, so the stream is the same,
    without the waits.
    """

    generate: Callable[..., Iterator[tuple[Any, Any]]]
    skip_bad_shards: bool
    skipped: list[str] = field(default_factory=list)  # shards given up since the reader last took them

    def __call__(self, **shard: Any) -> Iterator[tuple[Any, Any]]:
        name, done = shard_name(shard), 0
        attempts = 1 if name in _GIVEN_UP else SHARD_READ_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                for key, item in _after(self.generate(**shard), done):
                    done += _num_records(item)
                    yield key, item
                _check_tar_end(name)
                return
            except READ_ERRORS as error:
                if is_resource_error(error):
                    raise
                if done == 0 and _holds_no_rows(name):
                    return  # a valid, empty shard
                failure = describe(error)
            if attempt < attempts:
                delay = SHARD_RETRY_DELAY_S * 2 ** (attempt - 1)
                logger.warning("Reading shard %s failed after %d records (%s); retrying in %g s.",
                               name, done, failure, delay)
                time.sleep(delay)
        self._give_up(name, done, failure)

    def take_skipped(self) -> list[str]:
        taken, self.skipped = self.skipped, []
        return taken

    def _give_up(self, name: str, done: int, failure: str) -> None:
        message = f"shard {name} could not be read ({SHARD_READ_ATTEMPTS} attempts, {done} records read): {failure}"
        if not self.skip_bad_shards:
            raise ShardReadError(f"{message}; replace the file, or pass --skip_bad_shards to go on without it")
        if name not in _GIVEN_UP:
            logger.warning("%s; going on without the rest of it (--skip_bad_shards)", message)
        _GIVEN_UP.add(name)
        self.skipped.append(name)


def guard_shards(builder: DatasetBuilder, skip_bad_shards: bool) -> ShardGuard:
    """Make `builder`'s streams read through a `ShardGuard` (call before `builder.as_streaming_dataset`)."""
    name = "_generate_tables" if isinstance(builder, ArrowBasedBuilder) else "_generate_examples"
    # The class's function, not the bound method: the instance attribute set here would shadow a bound method that a
    # worker process gets by pickling.
    guard = ShardGuard(functools.partial(getattr(type(builder), name), builder), skip_bad_shards)
    setattr(builder, name, guard)
    return guard
