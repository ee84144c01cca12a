"""analysis reads runs in S3 (any S3-compatible store through AWS_ENDPOINT_URL) as it reads local ones:
the report of `s3://BUCKET/runs/RUN` equals that of the same files on disk."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from test_analysis import _png, synthetic_tables, write_run

from analysis import load
from analysis import report as R


def _upload(s3, local_run: Path, prefix: str) -> None:
    client = s3.client()
    for path in sorted(local_run.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(local_run).as_posix()}"
            client.put_object(Bucket=s3.bucket, Key=key, Body=path.read_bytes())


def test_load_and_report_read_an_s3_run(tmp_path, s3_server, capsys):
    run_dir = write_run(tmp_path / "storage", *synthetic_tables(run="s3run"))
    for tid in ("vanilla-b16_r0", "thermo-p2_r1"):
        _png(run_dir / "samples" / tid / "epoch_0002.png", 0.2)
        _png(run_dir / "samples" / tid / "epoch_0004.png", 0.8)
    _upload(s3_server, run_dir, "runs/s3run")

    local = load(run_dir)
    for uri in (s3_server.uri("runs", "s3run"), s3_server.uri("runs"), s3_server.uri("runs/s3run/results")):
        remote = load(uri)
        pd.testing.assert_frame_equal(remote.trials, local.trials)
        pd.testing.assert_frame_equal(remote.epochs, local.epochs)
        assert remote.runs == ["s3run"]
    remote = load(s3_server.uri("runs", "s3run"))
    assert sorted(remote.samples["epoch"]) == [4, 4]
    assert all(p.startswith(f"s3://{s3_server.bucket}/runs/s3run/samples/") for p in remote.samples["path"])

    out = tmp_path / "report"
    assert R.main([s3_server.uri("runs", "s3run"), "--out", str(out)]) == 0
    copied = sorted(p.name for p in (out / "samples").rglob("*.png"))
    assert copied == ["thermo-p2_r1_epoch_0004.png", "vanilla-b16_r0_epoch_0004.png"]
    assert (out / "samples" / "s3run" / "thermo-p2_r1_epoch_0004.png").read_bytes() == (
        run_dir / "samples" / "thermo-p2_r1" / "epoch_0004.png"
    ).read_bytes()


def test_a_missing_s3_run_is_named_whole(tmp_path, s3_server, capsys):
    missing = s3_server.uri("runs", "nothing")
    assert R.main([missing, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{missing} does not exist" in err


def test_tables_read_while_the_driver_rewrites_them_in_s3_are_whole(s3_server):
    """The driver rewrites epochs.parquet after every epoch; a reader on an object store (a report, a
    notebook, a resuming driver) must get one version of it. pyarrow's own reader takes the footer and
    the columns in separate requests, which can straddle two versions (a torn read: 'magic bytes not
    found'); `model.schema.read_table` takes one version. Here a writer rewrites the table as fast as
    it can (a row more each time) while both readers read it: every read is whole, rows 0..n-1."""
    import threading

    from analysis.remote import RemotePath, read_parquet
    from sweep.results import ResultsTables

    uri = s3_server.uri("runs", "race", "results")
    writer = ResultsTables(uri)
    writer.upsert_trial("t-0", status="RUNNING")
    writer.upsert_epochs("t-0", [{"epoch": 0}])
    writer.flush()
    done = threading.Event()

    def rewrite() -> None:
        epoch = 1
        while not done.is_set():
            writer.upsert_epochs("t-0", [{"epoch": epoch}])
            writer.flush()
            epoch += 1

    thread = threading.Thread(target=rewrite)
    thread.start()
    try:
        for _ in range(60):
            epochs = read_parquet(RemotePath(f"{uri}/epochs.parquet"))["epoch"].tolist()
            assert epochs == list(range(len(epochs)))
            reread = [row["epoch"] for row in ResultsTables(uri).epoch_rows()]
            assert reread == list(range(len(reread)))
    finally:
        done.set()
        thread.join()
    assert len(epochs) > 1, "the writer rewrote the table while it was read"


def test_a_large_table_rewritten_smaller_and_larger_is_read_whole(s3_server):
    """A table over pyarrow's 256 KiB read chunk, replaced alternately by a small and a large version
    while it is read: every read is one whole version (never a mix of chunks, never an error because
    the object shrank under the read)."""
    import threading

    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from model.schema import read_table

    fs, path = pafs.FileSystem.from_uri(s3_server.uri("big", "epochs.parquet"))
    versions = [pa.table({"v": [k] * n, "x": list(range(n))}) for k, n in ((0, 60_000), (1, 20), (2, 90_000))]
    pq.write_table(versions[0], path, filesystem=fs)
    assert fs.get_file_info(path).size > 256 * 1024
    done = threading.Event()

    def rewrite() -> None:
        k = 0
        while not done.is_set():
            k += 1
            pq.write_table(versions[k % 3], path, filesystem=fs)

    thread = threading.Thread(target=rewrite)
    thread.start()
    try:
        seen = set()
        for _ in range(40):
            table = read_table(fs, path)
            (v,) = set(table["v"].to_pylist())
            assert table["x"].to_pylist() == list(range(len(table))) and len(table) == versions[v].num_rows
            seen.add(v)
    finally:
        done.set()
        thread.join()
    assert len(seen) > 1, "the writer replaced the table while it was read"
