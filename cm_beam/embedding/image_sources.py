"""Reading an image pool as blocks of (example_id, uri, encoded image bytes).

A pool is one of three layouts, chosen with `--pool_format` (or inferred from the
file names and columns when that is unambiguous):

* `manifest`: Parquet or CSV files with an `example_id` and a `uri` column; each uri
  names one image file (local path or gs://...). Relative uris are resolved against
  the manifest's own directory, so a pool directory can be moved as a whole.
* `tfrecord`: TFRecord files of `tf.train.Example`, the image bytes under
  `--image_key` (default `image/encoded`) and the id under `--id_key` (default
  `image/source_id`), as written by the TF Object Detection and TFDS tooling.
* `parquet`: Parquet files with an `example_id` and a binary image column
  (`--image_column`, default `image`).

Everything goes through Beam's FileSystems, so local paths and gs:// work alike.

`inspect_pool` runs before the pipeline is built (the glob is expanded and the
schemas are checked, so a wrong flag fails before any work). `ReadImagePool` is the
PTransform that turns the inspected pool into a PCollection of *pool blocks*:
`pa.RecordBatch`es with the schema `POOL_BLOCK_SCHEMA`:

    example_id string, uri string, image binary (null = not fetched yet), error string

Manifest blocks carry uris only: the bytes are fetched by `fetch_images` in the
decode stage, after the blocks were spread over workers, so that I/O runs where
the decoding runs. A record that cannot be read at all (a truncated TFRecord, a row
without image bytes) gets an `error` and ends up in `rejected-*.parquet`.

The pure per-block work (parsing records, fetching uris) lives in plain functions
here so it can be tested without a pipeline.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import posixpath
import struct
from typing import Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from cm_beam.io import table_io
from cm_beam.errors import InputError, check_int

POOL_FORMATS = ("manifest", "tfrecord", "parquet")
DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_IMAGE_KEY = "image/encoded"
DEFAULT_ID_KEY = "image/source_id"
DEFAULT_BLOCK_ROWS = 64
DEFAULT_FETCH_THREADS = 16

POOL_BLOCK_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("error", pa.string()),
    ]
)

_TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrec")
_TABLE_SUFFIXES = (".parquet", ".pq")
_CSV_SUFFIXES = (".csv", ".tsv", ".csv.gz")


@dataclasses.dataclass(frozen=True)
class ImagePool:
    """An inspected pool: its layout, files and how to find ids and bytes in them."""

    pool_format: str
    files: Tuple[table_io.InputFile, ...]  # for tfrecord: fmt "tfrecord", num_rows -1 (unknown)
    image_column: str = DEFAULT_IMAGE_COLUMN
    image_key: str = DEFAULT_IMAGE_KEY
    id_key: str = DEFAULT_ID_KEY

    @property
    def num_rows(self) -> Optional[int]:
        """Number of pool records if known without reading the pool (not for TFRecord)."""
        if self.pool_format == "tfrecord":
            return None
        return sum(f.num_rows for f in self.files)

    @property
    def paths(self) -> List[str]:
        return [f.path for f in self.files]


def _strip_compression(path: str) -> str:
    lower = path.lower()
    for ext in (".gz", ".gzip", ".bz2", ".zst", ".deflate"):
        if lower.endswith(ext):
            return lower[: -len(ext)]
    return lower


def _format_from_name(path: str) -> Optional[str]:
    lower = path.lower()
    if _strip_compression(lower).endswith(_TFRECORD_SUFFIXES):
        return "tfrecord"
    if lower.endswith(_CSV_SUFFIXES):
        return "manifest"
    if lower.endswith(_TABLE_SUFFIXES):
        return None  # manifest or parquet: the columns decide
    return "unknown"


def inspect_pool(
    pattern: str,
    pool_format: Optional[str] = None,
    *,
    image_column: str = DEFAULT_IMAGE_COLUMN,
    image_key: str = DEFAULT_IMAGE_KEY,
    id_key: str = DEFAULT_ID_KEY,
    flag: str = "--pool",
) -> ImagePool:
    """Expands `pattern`, decides the layout and checks every file's schema.

    Raises InputError naming `flag` (and the file and column) on any problem, before
    any image is read.
    """
    if pool_format is not None and pool_format not in POOL_FORMATS:
        raise InputError(f"--pool_format: expected one of {', '.join(POOL_FORMATS)}, got {pool_format!r}")
    paths = table_io.expand_glob(pattern, flag)
    if pool_format is None:
        pool_format = _infer_format(paths, image_column, flag)
    if pool_format == "tfrecord":
        files = tuple(table_io.InputFile(p, "tfrecord", -1, 1, ()) for p in paths)
        return ImagePool("tfrecord", files, image_column, image_key, id_key)
    if pool_format == "manifest":
        required = {"example_id": "id", "uri": "any"}
    else:
        required = {"example_id": "id", image_column: "binary"}
    files = []
    for path in paths:
        if pool_format == "parquet" and path.lower().endswith(_CSV_SUFFIXES):
            raise InputError(f"{flag}: {path} is CSV; --pool_format=parquet needs Parquet files with image bytes")
        info = table_io.inspect_file(path, flag, required)
        if pool_format == "manifest":
            with_types = _column_type(path, "uri", info)
            if with_types is not None and not (pa.types.is_string(with_types) or pa.types.is_large_string(with_types)):
                raise InputError(f"{flag}: {path}: column 'uri' has type {with_types}, expected string")
        files.append(info)
    _check_ids(files, flag)
    return ImagePool(pool_format, tuple(files), image_column, image_key, id_key)


def _check_ids(files: Sequence[table_io.InputFile], flag: str) -> None:
    """Null or duplicate example_ids fail before any work, naming the file and the id.

    Only the id column is read (a column projection): seconds even for millions of
    rows, and every later stage keys on example_id.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    columns = []
    for info in files:
        if info.fmt == "parquet":
            with FileSystems.open(info.path) as f:
                table = pq.read_table(f, columns=["example_id"])
        else:
            table = table_io._read_csv(info.path, ["example_id"])
        ids = table.column("example_id").cast(pa.string())
        if ids.null_count:
            row = pc.index(pc.is_null(ids), True).as_py()
            raise InputError(f"{flag}: {info.path}: example_id is null in row {row}")
        columns.append(ids)
    if not columns:
        return
    counts = pc.value_counts(pa.chunked_array([c for col in columns for c in col.chunks], pa.string()))
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated):
        value = repeated[0].as_py()
        where = [f.path for f, ids in zip(files, columns) if pc.any(pc.equal(ids, value)).as_py()]
        raise InputError(
            f"{flag}: duplicate example_id {value!r} in {', '.join(where)} ({len(repeated)} ids repeated)"
        )


def _column_type(path: str, column: str, info: table_io.InputFile):
    if info.fmt != "parquet":
        return None  # CSV columns are read as strings when they hold paths
    import pyarrow.parquet as pq

    with FileSystems.open(path) as f:
        return pq.ParquetFile(f).schema_arrow.field(column).type


def _infer_format(paths: Sequence[str], image_column: str, flag: str) -> str:
    found = set()
    for path in paths:
        fmt = _format_from_name(path)
        if fmt == "unknown":
            raise InputError(
                f"{flag}: cannot tell the layout of {path} from its name; pass --pool_format "
                f"({', '.join(POOL_FORMATS)})"
            )
        if fmt is None:  # Parquet: a uri column makes it a manifest
            try:
                import pyarrow.parquet as pq

                with FileSystems.open(path) as f:
                    names = pq.ParquetFile(f).schema_arrow.names
            except Exception as e:
                raise InputError(f"{flag}: cannot read {path} as Parquet: {e}") from None
            if "uri" in names and image_column not in names:
                fmt = "manifest"
            elif image_column in names and "uri" not in names:
                fmt = "parquet"
            else:
                raise InputError(
                    f"{flag}: cannot tell whether {path} is a manifest (columns example_id, uri) or "
                    f"a Parquet pool (columns example_id, {image_column}); its columns are "
                    f"{', '.join(names)}; pass --pool_format"
                )
        found.add(fmt)
    if len(found) > 1:
        raise InputError(f"{flag}: files of different layouts ({', '.join(sorted(found))}) match; pass --pool_format")
    return found.pop()


def input_fingerprint(pool: ImagePool) -> dict:
    """A fingerprint of the pool files, so a later run can tell whether cached outputs match.

    Manifests are small and hashed by content (a changed uri changes the
    fingerprint; the image files behind the uris are not read). TFRecord and Parquet
    pools are large and hashed by path, size and modification time.
    """
    h = hashlib.sha256()
    method = "content" if pool.pool_format == "manifest" else "path+size+mtime"
    for path in pool.paths:
        meta = FileSystems.match([path])[0].metadata_list[0]
        h.update(path.encode("utf-8") + b"\0")
        if method == "content":
            with FileSystems.open(path) as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(json.dumps([meta.size_in_bytes, getattr(meta, "last_updated_in_seconds", None)]).encode())
    return {"sha256": h.hexdigest(), "method": method, "files": len(pool.paths), "format": pool.pool_format}


# ---------------------------------------------------------------------------
# Per-block work (no Beam).


def _make_block(ids, uris, images, errors) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [
            pa.array(ids, pa.string()),
            pa.array(uris, pa.string()),
            pa.array(images, pa.binary()),
            pa.array(errors, pa.string()),
        ],
        schema=POOL_BLOCK_SCHEMA,
    )


def _is_absolute(uri: str) -> bool:
    return uri.startswith("/") or "://" in uri


def manifest_blocks(unit: Tuple[str, str, int], block_rows: int) -> Iterator[pa.RecordBatch]:
    """Pool blocks (uris only) of one manifest row group; relative uris resolved."""
    path = unit[0]
    base = posixpath.dirname(path) or "."
    for batch in table_io.read_unit(unit, ["example_id", "uri"], block_rows):
        ids = batch.column(0).to_pylist()
        uris = batch.column(1).cast(pa.string()).to_pylist()
        errors = [None] * len(ids)
        for i, uri in enumerate(uris):
            if uri is None or uri == "":
                errors[i] = f"{path}: empty uri"
            elif not _is_absolute(uri):
                uris[i] = FileSystems.join(base, uri)
        yield _make_block(ids, uris, [None] * len(ids), errors)


def parquet_blocks(unit: Tuple[str, str, int], image_column: str, block_rows: int) -> Iterator[pa.RecordBatch]:
    """Pool blocks (with bytes) of one row group of a Parquet pool."""
    path, _, group = unit
    offset = 0
    for batch in table_io.read_unit(unit, ["example_id", image_column], block_rows):
        n = batch.num_rows
        images = batch.column(1)
        if not pa.types.is_binary(images.type):
            images = images.cast(pa.binary())
        uris = [f"{path}#row_group={group}&row={offset + i}" for i in range(n)]
        nulls = images.is_null().to_numpy(zero_copy_only=False)
        errors = np.where(nulls, f"null {image_column}", None).tolist()
        offset += n
        yield pa.RecordBatch.from_arrays(
            [batch.column(0), pa.array(uris, pa.string()), images, pa.array(errors, pa.string())],
            schema=POOL_BLOCK_SCHEMA,
        )


def _crc32c_fn():
    try:
        import google_crc32c

        return google_crc32c.value
    except ImportError:  # Beam's own fallback chain (snappy, crcmod)
        from apache_beam.io.tfrecordio import _default_crc32c_fn

        return _default_crc32c_fn


def _masked_crc(crc32c, data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class TFRecordCorruption(Exception):
    """The rest of a TFRecord file cannot be read (bad length or truncated)."""


def iter_tfrecords(f) -> Iterator[Tuple[Optional[bytes], Optional[str]]]:
    """Yields (payload, None) per record, or (None, reason) for a record whose data CRC fails.

    Raises TFRecordCorruption when the framing is broken (truncated file, bad length
    CRC): nothing after that point can be located.
    """
    crc32c = _crc32c_fn()
    while True:
        header = f.read(12)
        if not header:
            return
        if len(header) < 12:
            raise TFRecordCorruption(f"truncated record header ({len(header)} of 12 bytes)")
        length, length_crc = struct.unpack("<QI", header)
        if _masked_crc(crc32c, header[:8]) != length_crc:
            raise TFRecordCorruption("record length checksum mismatch")
        body = f.read(length + 4)
        if len(body) < length + 4:
            raise TFRecordCorruption(f"truncated record ({len(body)} of {length + 4} bytes)")
        data, data_crc = body[:length], struct.unpack("<I", body[length:])[0]
        if _masked_crc(crc32c, data) != data_crc:
            yield None, "record data checksum mismatch"
        else:
            yield data, None


def _feature_bytes(feature) -> Optional[bytes]:
    kind = feature.WhichOneof("kind")
    if kind == "bytes_list" and feature.bytes_list.value:
        return feature.bytes_list.value[0]
    return None


def _feature_id(feature) -> Optional[str]:
    kind = feature.WhichOneof("kind")
    if kind == "bytes_list" and feature.bytes_list.value:
        return feature.bytes_list.value[0].decode("utf-8", errors="replace")
    if kind == "int64_list" and feature.int64_list.value:
        return str(feature.int64_list.value[0])
    return None


def tfrecord_blocks(path: str, image_key: str, id_key: str, block_rows: int) -> Iterator[pa.RecordBatch]:
    """Pool blocks of one TFRecord file of tf.train.Example (compression from the suffix)."""
    from tensorflow.core.example import example_pb2  # protobuf only: no TF runtime start-up

    ids, uris, images, errors = [], [], [], []

    def flush():
        block = _make_block(ids, uris, images, errors)
        ids.clear(), uris.clear(), images.clear(), errors.clear()
        return block

    index = 0
    try:
        with FileSystems.open(path) as f:
            try:
                for data, problem in iter_tfrecords(f):
                    uri = f"{path}#record={index}"
                    example_id, image, error = None, None, problem
                    if data is not None:
                        try:
                            features = example_pb2.Example.FromString(data).features.feature
                        except Exception as e:  # protobuf DecodeError
                            error = f"not a tf.train.Example: {e}"
                        else:
                            example_id = _feature_id(features[id_key]) if id_key in features else None
                            image = _feature_bytes(features[image_key]) if image_key in features else None
                            if example_id is None:
                                error = f"no id feature '{id_key}' (set --id_key)"
                            elif image is None:
                                error = f"no bytes feature '{image_key}' (set --image_key)"
                    ids.append(example_id if example_id is not None else "")
                    uris.append(uri)
                    images.append(image if error is None else None)
                    errors.append(error)
                    index += 1
                    if len(ids) >= block_rows:
                        yield flush()
            except TFRecordCorruption as e:
                ids.append(""), uris.append(f"{path}#record={index}"), images.append(None)
                errors.append(f"unreadable from record {index} on: {e}")
    except Exception as e:  # a file that vanished or cannot be opened
        if isinstance(e, GeneratorExit):
            raise
        ids.append(""), uris.append(f"{path}#record={index}"), images.append(None)
        errors.append(f"cannot read {path}: {e}")
    if ids:
        yield flush()


def _read_uri(uri: str) -> Tuple[Optional[bytes], Optional[str]]:
    try:
        with FileSystems.open(uri, compression_type="uncompressed") as f:
            data = f.read()
    except Exception as e:
        text = str(e).split("\n")[0]
        return None, f"cannot read {uri}: {type(e).__name__}: {text[:300]}"
    return data, None


_FETCH_POOL: Optional[concurrent.futures.ThreadPoolExecutor] = None


def fetch_images(block: pa.RecordBatch, threads: int = DEFAULT_FETCH_THREADS) -> Tuple[List[Optional[bytes]], List[Optional[str]]]:
    """Returns (image bytes, error) per row, reading the uris of rows without bytes.

    Reads run on a thread pool: object stores answer each read after tens of
    milliseconds, so one image at a time would leave the worker idle.
    """
    global _FETCH_POOL
    images = block.column(2).to_pylist()
    errors = block.column(3).to_pylist()
    uris = block.column(1).to_pylist()
    todo = [i for i in range(block.num_rows) if images[i] is None and errors[i] is None]
    if not todo:
        return images, errors
    if threads > 1 and len(todo) > 1:
        if _FETCH_POOL is None:
            _FETCH_POOL = concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="cm-fetch")
        results = list(_FETCH_POOL.map(_read_uri, [uris[i] for i in todo]))
    else:
        results = [_read_uri(uris[i]) for i in todo]
    for i, (data, error) in zip(todo, results):
        images[i], errors[i] = data, error
    return images, errors


# ---------------------------------------------------------------------------
# The PTransform.


class ReadImagePool(beam.PTransform):
    """Reads an inspected image pool as a PCollection of pool blocks (`pa.RecordBatch`).

    Example:
        pool = inspect_pool("gs://bucket/pool/*.tfrecord")
        blocks = pipeline | ReadImagePool(pool, block_rows=64)
        results = blocks | EmbedAndScore("gs://bucket/model.keras", image_size=224)

    Units of parallelism are manifest row groups (then blocks of uris, spread again
    over workers, which is cheap), Parquet row groups and TFRecord files: shard
    large TFRecord or Parquet pools into many files / row groups.
    """

    def __init__(self, pool: ImagePool, block_rows: int = DEFAULT_BLOCK_ROWS):
        super().__init__()
        check_int("block_rows", block_rows)
        self._pool = pool
        self._block_rows = block_rows

    def expand(self, pbegin):
        pool, block_rows = self._pool, self._block_rows
        if pool.pool_format == "tfrecord":
            units = [(f.path, "tfrecord", 0) for f in pool.files]
        else:
            units = [
                (f.path, f.fmt, g)
                for f in pool.files
                if f.num_rows > 0
                for g in range(max(1, f.num_row_groups) if f.fmt == "parquet" else 1)
            ]
        listed = pbegin | "ListUnits" >> beam.Create(units) | "SpreadUnits" >> beam.Reshuffle()
        if pool.pool_format == "manifest":
            return (
                listed
                | "ReadManifest" >> beam.FlatMap(manifest_blocks, block_rows).with_output_types(pa.RecordBatch)
                # Blocks of uris are small: spreading them makes every worker fetch and decode.
                | "SpreadBlocks" >> beam.Reshuffle()
            )
        if pool.pool_format == "parquet":
            return listed | "ReadParquet" >> beam.FlatMap(
                parquet_blocks, pool.image_column, block_rows
            ).with_output_types(pa.RecordBatch)
        return listed | "ReadTFRecord" >> beam.FlatMap(
            lambda unit, *a: tfrecord_blocks(unit[0], *a), pool.image_key, pool.id_key, block_rows
        ).with_output_types(pa.RecordBatch)
