"""Every Python example in the README and docs/ runs, as written."""

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.fixture
def example_files(tmp_path, onnx_model, small_fashion, monkeypatch):
    """What the examples name: runs/fm48/model.onnx, runs/fm48/index, shoe.png (small real stand-ins)."""
    from latenthash import HashIndex
    from latenthash.encoder import Encoder
    from latenthash.ingest import add_images

    run = tmp_path / "runs" / "fm48"
    run.mkdir(parents=True)
    shutil.copy(onnx_model, run / "model.onnx")
    enc = Encoder.open(onnx_model)
    index = HashIndex(bits=enc.bits, feature_dim=enc.feature_dim)
    add_images(index, enc, small_fashion.train.images[:500], ids=np.arange(500), progress=False)
    index.save(run / "index")
    buf = io.BytesIO()
    Image.fromarray(small_fashion.test.images[0, :, :, 0]).save(buf, "PNG")
    (tmp_path / "shoe.png").write_bytes(buf.getvalue())
    monkeypatch.chdir(tmp_path)


WITH_EXAMPLES = [doc for doc in DOCS if python_blocks(doc)]


def test_docs_with_examples_are_the_expected_ones():
    """Only pages that hold Python examples are run below; a page that lost its examples would vanish silently."""
    assert {doc.name for doc in WITH_EXAMPLES} >= {"README.md", "usage.md", "scale.md"}


@pytest.mark.parametrize("doc", WITH_EXAMPLES, ids=lambda p: p.name)
def test_python_examples_run(doc, example_files):
    blocks = python_blocks(doc)
    assert blocks
    for block in blocks:
        exec(compile(block, str(doc), "exec"), {"__name__": "__doc_example__"})
