"""ReadTableBlocks: row groups read in units of about block_rows rows, every row once."""

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from cm_beam.io import table_io
from conftest import beam_args


def _write(path, start, n, row_group):
    ids = [f"ex-{i:06d}" for i in range(start, start + n)]
    pq.write_table(pa.table({"example_id": pa.array(ids, pa.string()),
                             "margin": np.arange(start, start + n, dtype=np.float32)}),
                   path, row_group_size=row_group)
    return ids


def _read_blocks(files, block_rows, tmp_path):
    """Runs ReadTableBlocks on the FnApiRunner; returns the blocks' (row count, ids, margins)."""
    out = []

    class Collect(beam.DoFn):
        def process(self, batch):
            yield (batch.num_rows, batch.column(0).to_pylist(), batch.column(1).to_pylist())

    with beam.Pipeline(options=PipelineOptions(beam_args(1))) as p:
        blocks = (p | table_io.ReadTableBlocks(files, ["example_id", "margin"], block_rows)
                  | beam.ParDo(Collect())
                  | beam.combiners.ToList())
        blocks | beam.Map(lambda b: pq.write_table(pa.table({"rows": [x[0] for x in b], "ids": [x[1] for x in b],
                                                               "margin": [x[2] for x in b]}),
                                                     str(tmp_path / "blocks.parquet")))
    t = pq.read_table(tmp_path / "blocks.parquet")
    return t.column("rows").to_pylist(), t.column("ids").to_pylist(), t.column("margin").to_pylist()


def test_small_row_groups_are_read_in_large_blocks_with_every_row_once(tmp_path):
    # Two files of 64-row groups (cm-embed's layout), one file of one row group, a CSV
    # file and an empty file: every row arrives once, with its own values, in blocks
    # of at most block_rows rows, and far fewer blocks than row groups.
    expected = _write(tmp_path / "a.parquet", 0, 3000, 64)            # 47 row groups
    expected += _write(tmp_path / "b.parquet", 3000, 1000, 64)        # 16 row groups
    expected += _write(tmp_path / "c.parquet", 4000, 500, 500)        # 1 row group
    csv_ids = [f"ex-{i:06d}" for i in range(4500, 4520)]
    pacsv.write_csv(pa.table({"example_id": csv_ids, "margin": np.arange(4500, 4520, dtype=np.float32)}),
                    tmp_path / "d.csv")
    expected += csv_ids
    _write(tmp_path / "e.parquet", 0, 0, 64)
    files = table_io.inspect_inputs([str(tmp_path / "*.parquet"), str(tmp_path / "*.csv")], "--x", {"example_id": "id"})
    assert sum(f.num_row_groups for f in files if f.fmt == "parquet") >= 64
    rows, ids, margins = _read_blocks(files, 1000, tmp_path)
    flat_ids = [i for block in ids for i in block]
    assert sorted(flat_ids) == sorted(expected) and len(flat_ids) == len(expected)
    for block_ids, block_margins in zip(ids, margins):
        assert [float(int(i[3:])) for i in block_ids] == block_margins  # each row keeps its own values
    assert max(rows) <= 1000
    assert len(rows) == 7  # a: 3 units of 15 groups and one of 2, b, c, d: 1 each (not 66 row groups)


def test_read_units_cover_every_row_group_once():
    files = [table_io.InputFile("a.parquet", "parquet", 10_000, 157, ("example_id",)),
             table_io.InputFile("b.parquet", "parquet", 100, 1, ("example_id",)),
             table_io.InputFile("c.parquet", "parquet", 0, 0, ("example_id",)),
             table_io.InputFile("d.csv", "csv", 5, 1, ("example_id",))]
    units = table_io.read_units(files, block_rows=1024)
    a = [u for u in units if u[0] == "a.parquet"]
    covered = [g for _, _, first, count in a for g in range(first, first + count)]
    assert covered == list(range(157))
    assert all(count == 16 for _, _, _, count in a[:-1])  # 1024 rows / ~64 rows per group
    assert [u for u in units if u[0] != "a.parquet"] == [("b.parquet", "parquet", 0, 1), ("d.csv", "csv", 0)]


def test_read_unit_with_a_cached_footer_reads_the_same_rows(tmp_path):
    path = str(tmp_path / "a.parquet")
    _write(path, 0, 1000, 64)
    cache = table_io._FooterCache()
    meta = cache.get(path)
    assert cache.get(path) is meta  # parsed once
    unit = (path, "parquet", 3, 5)
    with_meta = list(table_io.read_unit(unit, ["example_id", "margin"], 10_000, meta))
    without = list(table_io.read_unit(unit, ["example_id", "margin"], 10_000))
    assert len(with_meta) == 1 and with_meta[0].equals(without[0])
    assert with_meta[0].column(0).to_pylist() == [f"ex-{i:06d}" for i in range(3 * 64, 8 * 64)]
    # The old one-group unit still reads one row group.
    (one,) = table_io.read_unit((path, "parquet", 2), ["example_id"], 10_000)
    assert one.column(0).to_pylist() == [f"ex-{i:06d}" for i in range(128, 192)]


def test_footer_cache_keeps_the_newest_footers_within_its_bound(tmp_path):
    paths = []
    for name in "abc":
        paths.append(str(tmp_path / f"{name}.parquet"))
        _write(paths[-1], 0, 640, 64)  # 10 row groups x 2 columns each
    cache = table_io._FooterCache(max_column_chunks=40)
    first = cache.get(paths[0])
    cache.get(paths[1])
    assert cache.get(paths[0]) is first  # still cached; now the newest
    cache.get(paths[2])  # 60 column chunks > 40: the oldest (b) goes
    assert cache.get(paths[0]) is first
    assert set(cache._footers) == {paths[0], paths[2]}


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
