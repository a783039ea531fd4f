"""Reading and writing the tabular artifacts (Parquet, CSV) as blocks.

Every stage reads its inputs through `inspect_inputs` (before the pipeline is built:
globs are expanded, each file's schema is checked, so a missing column fails before
any work with a message naming the file and column) and `ReadTableBlocks` (in the
pipeline: one element per Parquet row group or CSV file, as `pa.RecordBatch`es,
never one Python object per row). Outputs are written with `WriteTableBlocks`.

Paths go through Beam's FileSystems: local paths and gs:// alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from cm_beam.errors import InputError

# Column kinds a stage can ask for, and the Arrow types that satisfy each.
_KIND_CHECKS = {
    "id": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t),
    "float": lambda t: pa.types.is_floating(t) or pa.types.is_integer(t),
    "int": pa.types.is_integer,
    "vector": lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
    and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)),
    "binary": lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
    "any": lambda t: True,
}

# Rows per block when a file is read; large enough to amortise per-element overhead.
DEFAULT_BLOCK_ROWS = 65536


@dataclasses.dataclass(frozen=True)
class InputFile:
    path: str
    fmt: str  # "parquet" or "csv"
    num_rows: int
    num_row_groups: int
    columns: Tuple[str, ...]
    schema: Optional[pa.Schema] = None


def expand_glob(pattern: str, flag: str) -> List[str]:
    """The files matching `pattern` (sorted), or InputError naming `flag`."""
    try:
        result = FileSystems.match([pattern])[0]
    except Exception as e:  # Beam raises BeamIOError for unmatched non-glob paths.
        raise InputError(f"{flag}: cannot list {pattern!r}: {e}") from None
    paths = sorted(m.path for m in result.metadata_list if not m.path.endswith("/"))
    if not paths:
        raise InputError(f"{flag}: no files match {pattern!r}")
    return paths


def _format_of(path: str) -> str:
    lower = path.lower()
    if lower.endswith((".csv", ".csv.gz", ".tsv")):
        return "csv"
    return "parquet"


def _read_csv(path: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
    with FileSystems.open(path) as f:
        data = f.read()
    convert = pacsv.ConvertOptions(
        include_columns=list(columns) if columns else None,
        column_types={"example_id": pa.string()},
    )
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    return pacsv.read_csv(io.BytesIO(data), parse_options=pacsv.ParseOptions(delimiter=delimiter), convert_options=convert)


def inspect_file(path: str, flag: str, required: Dict[str, str]) -> InputFile:
    """Checks one file's schema against `required` ({column: kind})."""
    fmt = _format_of(path)
    try:
        if fmt == "parquet":
            with FileSystems.open(path) as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
            num_rows, groups = meta.num_rows, meta.num_row_groups
        else:
            table = _read_csv(path)
            schema, num_rows, groups = table.schema, table.num_rows, 1
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{flag}: cannot read {path} as {fmt}: {e}") from None
    found = InputFile(path, fmt, num_rows, groups, tuple(schema.names), schema)
    check_columns([found], flag, required)
    return found


def check_columns(files: Sequence[InputFile], flag: str, required: Dict[str, str]) -> None:
    """Checks inspected files against `required` ({column: kind}), naming file and column."""
    for f in files:
        for column, kind in required.items():
            if column not in f.columns:
                raise InputError(f"{flag}: {f.path} has no column '{column}' (columns: {', '.join(f.columns)})")
            if f.schema is not None:
                arrow_type = f.schema.field(column).type
                if not _KIND_CHECKS[kind](arrow_type):
                    raise InputError(f"{flag}: {f.path}: column '{column}' has type {arrow_type}, expected {kind}")


def inspect_inputs(patterns: Iterable[str], flag: str, required: Dict[str, str]) -> List[InputFile]:
    """Expands globs and checks every matched file; fails before any work is done."""
    files: List[InputFile] = []
    for pattern in patterns:
        files.extend(inspect_file(p, flag, required) for p in expand_glob(pattern, flag))
    return files


def _normalise(table: pa.Table, path: str) -> pa.Table:
    """example_id as string, so ids compare equal across files of different writers."""
    if "example_id" in table.column_names:
        ids = table.column("example_id")
        if not (pa.types.is_string(ids.type)):
            table = table.set_column(
                table.column_names.index("example_id"), "example_id", ids.cast(pa.string())
            )
        if table.column("example_id").null_count:
            raise InputError(f"{path}: column 'example_id' has null values")
    return table


def read_unit(unit: Tuple, columns: Optional[Sequence[str]], block_rows: int,
              metadata: Optional[pq.FileMetaData] = None) -> Iterator[pa.RecordBatch]:
    """Reads one unit as record batches of at most `block_rows` rows.

    A unit is (path, format, row_group) or (path, format, first_row_group,
    num_row_groups); a CSV unit is the whole file. `metadata`, the file's parsed
    Parquet footer, saves parsing it again (see `_FooterCache`).
    """
    path, fmt, group = unit[:3]
    num_groups = unit[3] if len(unit) > 3 else 1
    if fmt == "parquet":
        with FileSystems.open(path) as f:
            groups = list(range(group, group + num_groups))
            table = pq.ParquetFile(f, metadata=metadata).read_row_groups(
                groups, columns=list(columns) if columns else None)
    else:
        table = _read_csv(path, columns)
    table = _normalise(table, path)
    batches = [b for b in table.to_batches(max_chunksize=block_rows) if b.num_rows]
    for batch in batches:
        # A block that is a slice of a larger row group is copied into its own
        # buffers: pickled as a slice, it would carry the whole row group.
        yield pa.concat_batches([batch]) if len(batches) > 1 else batch


def read_units(files: Sequence[InputFile], block_rows: int) -> List[Tuple]:
    """Units of about `block_rows` rows: runs of consecutive row groups of one file.

    Writers that emit one row group per small block (Beam's WriteToParquetBatched
    behind `WriteTableBlocks`: cm-embed writes a row group per 64-image inference
    batch) leave files of thousands of row groups. One unit per row group made
    every element a 64-row block, and every unit parsed the file's whole footer
    (O(row groups)) to read one group: reading grew as rows squared
    (benchmarks/README.md, "cm-select on singleton-heavy pools").
    """
    units: List[Tuple] = []
    for f in files:
        if f.num_rows <= 0:
            continue
        if f.fmt != "parquet":
            units.append((f.path, f.fmt, 0))
            continue
        groups = max(1, f.num_row_groups)
        per_unit = max(1, (block_rows * groups) // max(1, f.num_rows))  # groups of average size
        for first in range(0, groups, per_unit):
            units.append((f.path, f.fmt, first, min(per_unit, groups - first)))
    return units


class _FooterCache:
    """The parsed footers of the files a worker has read, newest kept.

    Each unit of a file would parse the whole footer again, which costs time in
    proportion to the file's row groups; a worker parses each file's footer once
    while it stays among the newest `max_column_chunks` cached column chunks (a
    parsed chunk holds ~1 KB: a 1M-row cm-embed file of 64-row groups and 5 columns
    is 78K chunks, 75 MB). The newest footer is always kept.
    """

    def __init__(self, max_column_chunks: int = 100_000):
        self._max = max_column_chunks
        self._footers: Dict[str, pq.FileMetaData] = {}

    def get(self, path: str) -> pq.FileMetaData:
        meta = self._footers.pop(path, None)
        if meta is None:
            with FileSystems.open(path) as f:
                meta = pq.ParquetFile(f).metadata
        self._footers[path] = meta  # most recent last
        while (sum(m.num_row_groups * m.num_columns for m in self._footers.values()) > self._max
               and len(self._footers) > 1):
            self._footers.pop(next(iter(self._footers)))
        return meta


class _ReadUnitFn(beam.DoFn):
    def __init__(self, columns: Optional[Sequence[str]], block_rows: int):
        self._columns = columns
        self._block_rows = block_rows
        self._footers = None

    def setup(self):
        self._footers = _FooterCache()

    def process(self, unit):
        path, fmt = unit[:2]
        metadata = self._footers.get(path) if fmt == "parquet" else None
        yield from read_unit(unit, self._columns, self._block_rows, metadata)


class ReadTableBlocks(beam.PTransform):
    """Reads inspected files as a PCollection of `pa.RecordBatch` (about `block_rows` rows each).

    Example:
        files = inspect_inputs(["gs://b/scores/*.parquet"], "--scores", {"example_id": "id"})
        batches = pipeline | ReadTableBlocks(files, columns=["example_id", "margin"])
    """

    def __init__(self, files: Sequence[InputFile], columns: Optional[Sequence[str]] = None, block_rows: int = DEFAULT_BLOCK_ROWS):
        super().__init__()
        self._units = read_units(files, block_rows)
        self._columns = list(columns) if columns else None
        self._block_rows = block_rows

    def expand(self, pbegin):
        columns, block_rows = self._columns, self._block_rows
        return (
            pbegin
            # Create reshuffles its elements (when there are several), which spreads
            # the row groups over workers before the reads.
            | "ListUnits" >> beam.Create(self._units)
            | "Read" >> beam.ParDo(_ReadUnitFn(columns, block_rows)).with_output_types(pa.RecordBatch)
        )


class WriteTableBlocks(beam.PTransform):
    """Writes a PCollection of `pa.RecordBatch` (or `pa.Table`) as Parquet shards.

    Shards are named `<prefix>-SSSSS-of-NNNNN.parquet`. An empty input still writes
    one empty shard with the schema, so readers always find a file.
    """

    def __init__(self, prefix: str, schema: pa.Schema, num_shards: int = 0):
        super().__init__()
        self._prefix = prefix
        self._schema = schema
        self._num_shards = num_shards

    def expand(self, pcoll):
        schema = self._schema

        def to_table(block):
            table = block if isinstance(block, pa.Table) else pa.Table.from_batches([block])
            return table.select(schema.names).cast(schema)

        return (
            pcoll
            | "ToTable" >> beam.Map(to_table)
            | "Write" >> beam.io.WriteToParquetBatched(
                self._prefix, schema, file_name_suffix=".parquet", num_shards=self._num_shards
            )
        )


def block_file_name(prefix: str, table: pa.Table) -> str:
    """`<prefix>-<digest>.parquet`, the digest a content hash of the block.

    Content-derived names make the write idempotent: a retried bundle rewrites the
    same file with the same rows instead of leaving a second copy behind.
    """
    digest = hashlib.sha1()
    for column in table.columns:
        for chunk in column.chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    digest.update(memoryview(buf))
    digest.update(str(table.num_rows).encode())
    return f"{prefix}-{digest.hexdigest()[:20]}.parquet"


class _WriteBlockFileFn(beam.DoFn):
    def __init__(self, prefix: str, schema: pa.Schema):
        self._prefix = prefix
        self._schema = schema

    def process(self, block):
        table = block if isinstance(block, pa.Table) else pa.Table.from_batches([block])
        if table.num_rows == 0:
            return
        table = table.select(self._schema.names).cast(self._schema)
        path = block_file_name(self._prefix, table)
        with FileSystems.create(path) as f:
            pq.write_table(table, f)
        yield path


class WriteBlockFiles(beam.PTransform):
    """Writes each record batch as its own Parquet file, `<prefix>-<content hash>.parquet`.

    For outputs that are already a few large blocks (one per key-range bucket), this
    skips the four extra stages of Beam's file sink (initialise, group, pre-finalise,
    finalise): the output directory's manifest, written after the job succeeds, is
    the commit marker. Call `ensure_output_file` afterwards so that an empty output
    still has one (empty) file carrying the schema. Returns the written paths.
    """

    def __init__(self, prefix: str, schema: pa.Schema):
        super().__init__()
        self._prefix = prefix
        self._schema = schema

    def expand(self, pcoll):
        return pcoll | "WriteFiles" >> beam.ParDo(_WriteBlockFileFn(self._prefix, self._schema))


def ensure_output_file(prefix: str, schema: pa.Schema) -> None:
    """Writes an empty `<prefix>-empty.parquet` if no `<prefix>-*.parquet` exists."""
    if FileSystems.match([prefix + "-*.parquet"])[0].metadata_list:
        return
    with FileSystems.create(prefix + "-empty.parquet") as f:
        pq.write_table(schema.empty_table(), f)


def read_table(pattern: str, flag: str = "--input", columns: Optional[Sequence[str]] = None) -> pa.Table:
    """Reads every file matching `pattern` into one table (for tests and small inputs)."""
    tables = []
    for path in expand_glob(pattern, flag):
        if _format_of(path) == "csv":
            tables.append(_normalise(_read_csv(path, columns), path))
        else:
            with FileSystems.open(path) as f:
                tables.append(_normalise(pq.read_table(f, columns=list(columns) if columns else None), path))
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
