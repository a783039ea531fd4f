"""Pool readers: layout inference, schema checks, TFRecord framing, manifest/Parquet blocks."""

import io
import os
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cm_beam.embedding import image_sources
from cm_beam.errors import InputError


def _masked_crc(data):
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


def _example(example_id=None, image=None, id_key="image/source_id", image_key="image/encoded", int_id=False):
    from tensorflow.core.example import example_pb2

    ex = example_pb2.Example()
    if example_id is not None:
        if int_id:
            ex.features.feature[id_key].int64_list.value.append(int(example_id))
        else:
            ex.features.feature[id_key].bytes_list.value.append(example_id.encode())
    if image is not None:
        ex.features.feature[image_key].bytes_list.value.append(image)
    return ex.SerializeToString()


def test_tfrecord_framing_matches_tensorflow_writer(tmp_path):
    import tensorflow as tf

    path = str(tmp_path / "a.tfrecord")
    payloads = [b"x" * k for k in (0, 1, 100, 5000)]
    with tf.io.TFRecordWriter(path) as w:
        for p in payloads:
            w.write(p)
    with open(path, "rb") as f:
        got = list(image_sources.iter_tfrecords(f))
    assert got == [(p, None) for p in payloads]
    # our own writer (used by the tests below) is byte-identical to TensorFlow's
    assert open(path, "rb").read() == b"".join(_record(p) for p in payloads)


def test_tfrecord_corrupt_data_skips_one_record_and_truncation_stops(tmp_path):
    good = _record(b"abc")
    bad = bytearray(_record(b"def"))
    bad[13] ^= 0xFF  # flip a payload byte: data CRC fails, framing is intact
    data = good + bytes(bad) + good + _record(b"ghi")[:-3]  # last record truncated
    got = []
    with pytest.raises(image_sources.TFRecordCorruption, match="truncated"):
        for item in image_sources.iter_tfrecords(io.BytesIO(data)):
            got.append(item)
    assert got == [(b"abc", None), (None, "record data checksum mismatch"), (b"abc", None)]


def test_tfrecord_blocks_ids_bytes_and_errors(tmp_path):
    path = str(tmp_path / "pool.tfrecord")
    records = [
        _example("a", b"IMG-A"),
        _example("7", b"IMG-B", int_id=True),
        _example(None, b"IMG-C"),  # no id
        _example("d", None),  # no image
        b"\x08\x96\x01 definitely not an Example \xff",
        _example("e", b"IMG-E"),
    ]
    with open(path, "wb") as f:
        f.write(b"".join(_record(r) for r in records))
        f.write(_record(_example("lost", b"X"))[:10])  # truncated tail
    blocks = list(image_sources.tfrecord_blocks(path, "image/encoded", "image/source_id", block_rows=4))
    assert [b.num_rows for b in blocks] == [4, 3]
    rows = pa.Table.from_batches(blocks).to_pylist()
    assert [r["uri"] for r in rows] == [f"{path}#record={i}" for i in range(7)]
    assert rows[0] == {"example_id": "a", "uri": f"{path}#record=0", "image": b"IMG-A", "error": None}
    assert rows[1]["example_id"] == "7" and rows[1]["image"] == b"IMG-B"
    assert "image/source_id" in rows[2]["error"] and rows[2]["image"] is None
    assert "image/encoded" in rows[3]["error"]
    assert rows[4]["error"] is not None  # not an Example (or no features): never crashes
    assert rows[5]["image"] == b"IMG-E" and rows[5]["error"] is None
    assert "unreadable from record 6" in rows[6]["error"]


def test_tfrecord_custom_keys_and_gzip(tmp_path):
    import gzip

    path = str(tmp_path / "pool.tfrecord.gz")
    with gzip.open(path, "wb") as f:
        f.write(_record(_example("k1", b"BYTES", id_key="id", image_key="jpeg")))
    pool = image_sources.inspect_pool(str(tmp_path / "*.gz"), image_key="jpeg", id_key="id")
    assert pool.pool_format == "tfrecord" and pool.num_rows is None
    rows = pa.Table.from_batches(list(image_sources.tfrecord_blocks(pool.paths[0], "jpeg", "id", 8))).to_pylist()
    assert rows == [{"example_id": "k1", "uri": f"{path}#record=0", "image": b"BYTES", "error": None}]


def test_missing_tfrecord_file_is_a_rejected_row(tmp_path):
    path = str(tmp_path / "gone.tfrecord")
    rows = pa.Table.from_batches(list(image_sources.tfrecord_blocks(path, "image/encoded", "image/source_id", 8))).to_pylist()
    assert len(rows) == 1 and "cannot read" in rows[0]["error"]


def test_manifest_blocks_resolve_relative_uris(tmp_path):
    (tmp_path / "sub").mkdir()
    manifest = str(tmp_path / "sub" / "m.parquet")
    pq.write_table(pa.table({"example_id": [1, 2, 3], "uri": ["img/a.png", "/abs/b.png", ""]}), manifest)
    pool = image_sources.inspect_pool(manifest)
    assert pool.pool_format == "manifest" and pool.num_rows == 3
    rows = pa.Table.from_batches(list(image_sources.manifest_blocks((manifest, "parquet", 0), 2))).to_pylist()
    assert [r["example_id"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["uri"] == str(tmp_path / "sub" / "img" / "a.png")
    assert rows[1]["uri"] == "/abs/b.png"
    assert rows[2]["error"] and "empty uri" in rows[2]["error"]
    assert all(r["image"] is None for r in rows)


def test_csv_manifest_and_fetch(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"AAA")
    manifest = tmp_path / "m.csv"
    manifest.write_text("example_id,uri\n0001,a.bin\n0002,missing.bin\n")
    pool = image_sources.inspect_pool(str(manifest))
    assert pool.pool_format == "manifest"
    (block,) = list(image_sources.manifest_blocks((str(manifest), "csv", 0), 10))
    assert block.column(0).to_pylist() == ["0001", "0002"]  # ids stay strings, leading zeros kept
    images, errors = image_sources.fetch_images(block, threads=4)
    assert images[0] == b"AAA" and errors[0] is None
    assert images[1] is None and "missing.bin" in errors[1]


def test_parquet_pool_blocks(tmp_path):
    path = str(tmp_path / "p.parquet")
    pq.write_table(pa.table({"example_id": ["a", "b", "c"], "image": [b"1", None, b"3"]}), path, row_group_size=2)
    pool = image_sources.inspect_pool(path)
    assert pool.pool_format == "parquet" and pool.files[0].num_row_groups == 2
    rows = []
    for g in range(2):
        for b in image_sources.parquet_blocks((path, "parquet", g), "image", 8):
            rows += pa.Table.from_batches([b]).to_pylist()
    assert [r["example_id"] for r in rows] == ["a", "b", "c"]
    assert rows[1]["error"] == "null image" and rows[0]["error"] is None and rows[2]["image"] == b"3"
    assert rows[2]["uri"] == f"{path}#row_group=1&row=0"


def test_inspect_pool_errors_name_the_flag_and_file(tmp_path):
    with pytest.raises(InputError, match="--pool: no files match"):
        image_sources.inspect_pool(str(tmp_path / "*.parquet"))
    ambiguous = str(tmp_path / "x.parquet")
    pq.write_table(pa.table({"example_id": ["a"], "other": [1]}), ambiguous)
    with pytest.raises(InputError, match="--pool_format"):
        image_sources.inspect_pool(ambiguous)
    with pytest.raises(InputError, match="no column 'image'"):
        image_sources.inspect_pool(ambiguous, "parquet")
    with pytest.raises(InputError, match="no column 'uri'"):
        image_sources.inspect_pool(ambiguous, "manifest")
    (tmp_path / "pool.bin").write_bytes(b"")
    with pytest.raises(InputError, match="pass --pool_format"):
        image_sources.inspect_pool(str(tmp_path / "pool.bin"))
    with pytest.raises(InputError, match="--pool_format"):
        image_sources.inspect_pool(ambiguous, "zip")
    wrong_type = str(tmp_path / "w.parquet")
    pq.write_table(pa.table({"example_id": ["a"], "image": ["not bytes"]}), wrong_type)
    with pytest.raises(InputError, match="image.*expected binary"):
        image_sources.inspect_pool(wrong_type, "parquet")


def test_input_fingerprint_changes_with_content(tmp_path):
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"example_id": ["a"], "uri": ["x.png"]}), manifest)
    first = image_sources.input_fingerprint(image_sources.inspect_pool(manifest))
    assert first == image_sources.input_fingerprint(image_sources.inspect_pool(manifest))
    pq.write_table(pa.table({"example_id": ["a"], "uri": ["y.png"]}), manifest)
    assert image_sources.input_fingerprint(image_sources.inspect_pool(manifest))["sha256"] != first["sha256"]


def test_null_and_duplicate_ids_fail_before_any_work(tmp_path):
    a, b = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    pq.write_table(pa.table({"example_id": ["x", None], "uri": ["1.png", "2.png"]}), a)
    with pytest.raises(InputError, match="a.parquet: example_id is null in row 1"):
        image_sources.inspect_pool(a)
    pq.write_table(pa.table({"example_id": ["x", "y"], "uri": ["1.png", "2.png"]}), a)
    pq.write_table(pa.table({"example_id": ["z", "y"], "uri": ["3.png", "4.png"]}), b)
    with pytest.raises(InputError, match="duplicate example_id 'y' in .*a.parquet, .*b.parquet"):
        image_sources.inspect_pool(str(tmp_path / "*.parquet"))
    pq.write_table(pa.table({"example_id": ["z", "w"], "uri": ["3.png", "4.png"]}), b)
    assert image_sources.inspect_pool(str(tmp_path / "*.parquet")).num_rows == 4
