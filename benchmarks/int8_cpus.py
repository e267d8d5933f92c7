"""One INT8 file on two x86 CPU kinds: codes of the 10,000 Fashion-MNIST test images from this CPU and from an
emulated AVX2-only CPU without VNNI (qemu-user `-cpu Haswell`, where ONNX Runtime runs other INT8 kernels), each
against the FP32 file's codes, with mAP@all of each against the FP32 database codes.

    python benchmarks/int8_cpus.py --model runs/fm48/model.onnx   # needs model.int8.onnx beside it, qemu-user-static

Speeds under emulation mean nothing; only the codes are compared. Results: benchmarks/results/int8_cpus_<this CPU's
LLVM name>.json.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import save

from latenthash.codes import threshold
from latenthash.cpu import cpu_info
from latenthash.encoder import Encoder
from latenthash.export.data import load_fashion_mnist
from latenthash.export.evaluate import encode_probs
from latenthash.metrics import hamming_retrieval

EMULATED = """
import sys, numpy as np
from latenthash.cpu import cpu_info
from latenthash.encoder import Encoder
from latenthash.export.evaluate import encode_probs
print(cpu_info(), file=sys.stderr)
np.save(sys.argv[3], encode_probs(Encoder.open(sys.argv[1], runtime="onnxruntime"), np.load(sys.argv[2]))[0])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the FP32 file; its INT8 copy lies beside it")
    args = ap.parse_args()
    fp32 = Path(args.model)
    int8 = fp32.with_name(f"{fp32.stem}.int8{fp32.suffix}")
    qemu = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")
    if qemu is None:
        raise SystemExit("needs qemu-user-static (apt-get install qemu-user-static)")
    ds = load_fashion_mnist()
    probs = {name: encode_probs(Encoder.open(path, runtime="onnxruntime"), ds.test.images)[0]
             for name, path in (("fp32", fp32), ("int8 here", int8))}
    database = threshold(encode_probs(Encoder.open(fp32, runtime="onnxruntime"), ds.train.images)[0])
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "images.npy", ds.test.images)
        (Path(tmp) / "encode.py").write_text(EMULATED)
        proc = subprocess.run([qemu, "-cpu", "Haswell", sys.executable, Path(tmp) / "encode.py", int8,
                               Path(tmp) / "images.npy", Path(tmp) / "probs.npy"], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        probs["int8 AVX2, no VNNI (emulated)"] = np.load(Path(tmp) / "probs.npy")
    bits = probs["fp32"].shape[1]
    rows = []
    print(f"this CPU: {cpu_info()['llvm_cpu']} {' '.join(cpu_info()['simd'])}\n"
          "| codes | bit agreement with FP32 | bit agreement with INT8 here | mAP@all |\n|---|---|---|---|")
    for name, p in probs.items():
        rep = hamming_retrieval(threshold(p), database, ds.test.labels, ds.train.labels, bits=bits)
        row = {"codes": name, "agree_fp32": float(((p >= 0.5) == (probs["fp32"] >= 0.5)).mean()),
               "agree_int8_here": float(((p >= 0.5) == (probs["int8 here"] >= 0.5)).mean()), "map_all": rep.map_all}
        rows.append(row)
        print(f"| {name} | {row['agree_fp32']:.4f} | {row['agree_int8_here']:.4f} | {row['map_all']:.4f} |")
    print("saved", save(f"int8_cpus_{cpu_info()['llvm_cpu']}", {"model": str(fp32), "rows": rows}))


if __name__ == "__main__":
    main()
