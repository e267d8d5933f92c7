"""Index files that rot on disk: `latenthash verify` names the damaged file, and 1,000 rounds of flipped bytes in
every file of a saved index never crash or hang a process, never pass a verified open, and never make a search
return an id the index does not hold (benchmarks/fuzz_index.py, run as a child process with a deadline)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from latenthash import HashIndex

ROOT = Path(__file__).resolve().parent.parent


def test_verify_names_the_damaged_file(tmp_path, rng):
    index = HashIndex(bits=32, feature_dim=8)
    index.add(np.arange(100), rng.random((100, 32)) < 0.5, rng.standard_normal((100, 8)).astype(np.float32))
    index.save(tmp_path / "ix")
    cli = [sys.executable, "-m", "latenthash.cli", "verify", str(tmp_path / "ix")]
    ok = subprocess.run(cli, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: every checksum")
    gen = tmp_path / "ix" / (tmp_path / "ix" / "CURRENT").read_text().split()[0]
    data = bytearray((gen / "features.npy").read_bytes())
    data[-3] ^= 0x40
    (gen / "features.npy").write_bytes(bytes(data))
    bad = subprocess.run(cli, capture_output=True, text=True)
    assert bad.returncode == 1 and "DAMAGED" in bad.stderr and "features.npy fails its checksum" in bad.stderr
    assert "codes.npy" not in bad.stderr  # only the damaged file is named


def test_a_thousand_rounds_of_rot(tmp_path):
    out = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fuzz_index.py"), "--rounds", "1000",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]  # a crash (signal) or an error ends the child
    summary = json.loads(out.read_text())
    assert summary["unexpected"] == [] and summary["verified_accepted"] == []
    assert summary["verified_refused"] == 1000
    assert summary["unverified_refused"] + summary["unverified_served"] == 1000
    assert {"CURRENT", "header.json", "codes.npy", "ids.npy", "features.npy", "scales.npy", "metadata.bin",
            "metadata_offsets.npy"} <= set(summary["by_file"])
