"""Every CLI command end to end, as a user runs it: a subprocess on small real data, its output and exit code
checked, including the error exits (exit 2 with one line naming the problem, never a traceback)."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def cli(*args, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "latenthash.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def assert_one_line_error(proc, match: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and match in proc.stderr, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def photos(tmp_path_factory, small_fashion):
    """300 images as a user's folder holds them: PNG and JPEG, several sizes, RGB and grey, nested folders; plus a
    corrupt JPEG and a text file."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    for i in range(300):
        sub = root / f"trip{i % 3}" / ("day1" if i % 2 else "day2")
        sub.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(small_fashion.train.images[i, ..., 0])
        size = int(rng.integers(20, 90))
        img = img.resize((size, size + int(rng.integers(0, 20))))
        if i % 4 == 0:
            img = img.convert("RGB")
        img.save(sub / f"img{i}.{'jpg' if i % 5 == 0 else 'png'}")
    (root / "trip0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_index_own_photos_then_search_them(onnx_model, photos, tmp_path):
    out = tmp_path / "idx"
    proc = cli("index", "--model", onnx_model, "--images", photos, "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["indexed"] == 300 and report["unreadable"] == 2 and report["count"] == 300
    assert "broken.jpg" in proc.stderr and "notes.txt" in proc.stderr
    query = photos / "trip1" / "day1" / "img7.png"
    proc = cli("search", query, "--index", out, "--model", onnx_model, "--k", 5, "--json",
               "--sheet", tmp_path / "hits.png")
    assert proc.returncode == 0, proc.stderr[-2000:]
    hits = json.loads(proc.stdout)[0]["hits"]
    assert hits[0]["metadata"]["path"] == str(query.resolve()) and hits[0]["distance"] == 0
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-3) and len(hits) == 5
    assert Image.open(tmp_path / "hits.png").size[0] > 5 * 96
    table = cli("search", query, "--index", out, "--model", onnx_model, "--k", 3)
    assert table.returncode == 0 and "img7.png" in table.stdout and table.stdout.count("distance") == 3
    # a rerun refuses to overwrite; --add resumes, skipping what is indexed
    assert_one_line_error(cli("index", "--model", onnx_model, "--images", photos, "--out", out), "already exists")
    proc = cli("index", "--model", onnx_model, "--images", photos, "--out", out, "--add")
    assert proc.returncode == 0 and json.loads(proc.stdout)["already_indexed"] == 300
    assert_one_line_error(cli("search", query, "--model", onnx_model), "--index")
    assert_one_line_error(cli("index", "--model", onnx_model, "--images", tmp_path / "nowhere", "--out",
                              tmp_path / "i2"), "neither a folder")


def test_index_dataset_split_add_and_refusals(onnx_model, tmp_path):
    out = tmp_path / "fm"
    proc = cli("index", "--model", onnx_model, "--out", out, "--limit", 300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["count"] == 300
    assert_one_line_error(cli("index", "--model", onnx_model, "--out", out, "--limit", 10), "already exists")
    proc = cli("index", "--model", onnx_model, "--out", out, "--limit", 50, "--split", "test", "--add")
    assert proc.returncode == 0 and json.loads(proc.stdout)["count"] == 350
    assert_one_line_error(cli("index", "--model", tmp_path / "none.onnx", "--out", tmp_path / "x"), "not found")


def test_train_eval_export_on_digits(tmp_path):
    run = tmp_path / "run"
    proc = cli("train", "--dataset", "digits", "--out", run, "--bits", 16, "--epochs", 1, "--feature-dim", 32)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "checkpoint.pt").is_file() and "trained 16-bit model" in proc.stdout
    proc = cli("eval", run, "--no-baselines", "--json", tmp_path / "eval.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(proc.stdout)
    assert figures["bits"] == 16 and 0 < figures["map_all"] <= 1
    assert json.loads((tmp_path / "eval.json").read_text())["map_all"] == figures["map_all"]
    proc = cli("export", run, "--out", run / "model.onnx", "--precision", "int8", "--calibration", 256)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["precisions"]["int8"]["kept"] and (run / "model.int8.onnx").is_file()
    proc = cli("eval", run, "--no-baselines", "--model", run / "model.int8.onnx")
    assert proc.returncode == 0 and 0 < json.loads(proc.stdout)["map_all"] <= 1
    assert_one_line_error(cli("export", run, "--out", tmp_path / "m.onnx", "--precision", "int8", "--calibration",
                              8), "at least 64")
    assert not (tmp_path / "m.onnx").exists()
    assert_one_line_error(cli("train", "--dataset", "nope", "--out", tmp_path / "r2"), "nope")
    assert_one_line_error(cli("eval", tmp_path / "missing"), "checkpoint")
    assert_one_line_error(cli("export", tmp_path / "missing", "--out", tmp_path / "m.onnx"), "checkpoint")


def test_serve_answers_then_stops_on_sigterm(onnx_model, tmp_path, small_fashion):
    from latenthash.client import Client

    proc = subprocess.Popen([sys.executable, "-m", "latenthash.cli", "serve", "--index", tmp_path / "srv",
                             "--create", "--model", onnx_model, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        assert "serving on" in line, proc.stderr.read() if proc.poll() is not None else line
        port = line.strip().rsplit(":", 1)[1]
        with Client(f"127.0.0.1:{port}", timeout=30) as client:
            client.upsert(np.arange(20), images=list(small_fashion.train.images[:20]))
            res = client.search(images=[small_fashion.train.images[3]], k=3)
            assert res.ids[0, 0] == 3
        query = tmp_path / "q.png"
        Image.fromarray(small_fashion.train.images[3, ..., 0]).save(query)
        remote = cli("search", query, "--server", f"127.0.0.1:{port}", "--k", 3, "--json", timeout=120)
        assert remote.returncode == 0, remote.stderr[-2000:]
        hits = json.loads(remote.stdout)[0]["hits"]
        assert [h["id"] for h in hits] == res.ids[0].tolist() and hits[0]["distance"] == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "srv" / "CURRENT").is_file()  # the acknowledged writes were checkpointed on the way out
    proc = cli("serve", "--index", tmp_path / "typo", "--port", 0)
    assert_one_line_error(proc, "--create")


def test_version_and_help():
    from latenthash import __version__

    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"latenthash {__version__}"
    proc = cli("--help")
    assert proc.returncode == 0
    for command in ("train", "eval", "export", "index", "search", "serve", "quickstart"):
        assert command in proc.stdout


def test_quickstart_on_digits(tmp_path):
    proc = cli("quickstart", "--dataset", "digits", "--epochs", 1, "--out", tmp_path / "qs")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert summary["dataset"] == "digits" and 0 < summary["map_all"] <= 1
    assert 0 < summary["service_precision_at_10"] <= 1 and summary["two_step_ms"] > 0
    for name in ("model.onnx", "samples.png", "quality.json"):
        assert (tmp_path / "qs" / name).is_file()
    assert "6/6 results" in proc.stdout
    assert_one_line_error(cli("quickstart", "--dataset", "nope", "--out", tmp_path / "q2"), "nope")


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory, small_fashion):
    """A user's labelled folder: one subfolder per class, colour PNG and JPEG images of mixed sizes (tinted
    Fashion-MNIST items of three classes)."""
    root = tmp_path_factory.mktemp("labelled") / "clothes"
    rng = np.random.default_rng(5)
    for c, name in ((0, "shirts"), (1, "trousers"), (7, "sneakers")):
        (root / name).mkdir(parents=True)
        items = np.flatnonzero(small_fashion.train.labels == c)[:150]
        for j, i in enumerate(items):
            grey = small_fashion.train.images[i, ..., 0].astype(np.float32) / 255
            tint = rng.uniform(0.3, 1.0, 3)
            rgb = (grey[..., None] * tint * 255).astype(np.uint8)
            w = int(rng.integers(24, 80))
            img = Image.fromarray(rgb).resize((w, w + int(rng.integers(-4, 12))))
            img.save(root / name / f"{name}{j}.{'jpg' if j % 3 == 0 else 'png'}", quality=92)
    return root


def serving(args: list) -> tuple[subprocess.Popen, str]:
    """`latenthash serve ARGS --port 0` started, and its address once it says it serves."""
    proc = subprocess.Popen([sys.executable, "-m", "latenthash.cli", "serve", *map(str, args), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    if "serving on" not in line:
        proc.kill()
        raise AssertionError(proc.stderr.read())
    return proc, line.strip().rsplit(" ", 1)[1]


def test_own_labelled_folder_end_to_end(labelled_folder, tmp_path):
    """train --dataset folder -> export with both reduced precisions (checked on the run's own images, found
    through what the run recorded) -> index --images -> search -> serve -> search --server; and the data moved."""
    run = tmp_path / "run"
    proc = cli("train", "--dataset", "folder", "--data-dir", labelled_folder, "--bits", 16, "--epochs", 8,
               "--feature-dim", 32, "--out", run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = cli("export", run, "--out", run / "m.onnx", "--precision", "fp16", "--precision", "int8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["parity_images"].endswith("test images of folder")
    assert report["precisions"]["fp16"]["kept"] and report["precisions"]["int8"]["kept"]
    assert report["precisions"]["int8"]["held_out_images"] == 45  # the run's own seeded test split of 450
    moved = labelled_folder.parent / "moved"
    labelled_folder.rename(moved)
    try:
        assert_one_line_error(cli("export", run, "--out", tmp_path / "m2.onnx", "--precision", "int8"), "--data-dir")
        assert not (tmp_path / "m2.onnx").exists()
        proc = cli("export", run, "--out", tmp_path / "m2.onnx", "--data-dir", moved)
        assert proc.returncode == 0 and json.loads(proc.stdout)["parity_images"].endswith("of folder")
        proc = cli("export", run, "--out", tmp_path / "m3.onnx", "--random-pixels")  # only when asked, and said
        assert proc.returncode == 0 and "random images" in json.loads(proc.stdout)["parity_images"]
        assert_one_line_error(cli("export", run, "--out", tmp_path / "m4.onnx", "--random-pixels", "--precision",
                                  "fp16"), "--data-dir")
        proc = cli("eval", run, "--no-baselines", "--data-dir", moved)
        assert proc.returncode == 0 and json.loads(proc.stdout)["map_all"] > 0.5, proc.stderr[-2000:]
        idx = tmp_path / "idx"
        proc = cli("index", "--model", run / "m.int8.onnx", "--images", moved, "--out", idx)
        assert proc.returncode == 0 and json.loads(proc.stdout)["indexed"] == 450, proc.stderr[-2000:]
        query = moved / "sneakers" / "sneakers3.jpg"
        proc = cli("search", query, "--index", idx, "--model", run / "m.int8.onnx", "--k", 5, "--json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        hits = json.loads(proc.stdout)[0]["hits"]
        assert hits[0]["metadata"]["path"] == str(query.resolve()) and hits[0]["distance"] == 0
        assert sum("/sneakers/" in h["metadata"]["path"] for h in hits) >= 4
        server, address = serving(["--index", idx, "--model", run / "m.int8.onnx"])
        try:
            remote = cli("search", query, "--server", address, "--k", 5, "--json", timeout=120)
            assert remote.returncode == 0, remote.stderr[-2000:]
            assert [h["id"] for h in json.loads(remote.stdout)[0]["hits"]] == [h["id"] for h in hits]
        finally:
            server.terminate()
            server.wait(60)
    finally:
        moved.rename(labelled_folder)
