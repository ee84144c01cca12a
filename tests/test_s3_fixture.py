"""The S3 test server answers as S3 does through the standard AWS environment alone (pyarrow and boto3)."""

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def test_pyarrow_round_trip_through_environment(s3_server):
    fs, path = pafs.FileSystem.from_uri(s3_server.uri("runs", "t.parquet"))
    pq.write_table(pa.table({"a": [1, 2, 3]}), path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).column("a").to_pylist() == [1, 2, 3]
    assert s3_server.keys("runs/") == ["runs/t.parquet"]
