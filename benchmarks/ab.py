"""One benchmark, two commits, side by side in one run: the working tree against a base commit, alternated.

    python benchmarks/ab.py --base COMMIT [--rounds 2] --result grpc_learned --rows grpc -- \
        benchmarks/bench_grpc.py --model RUN/model.onnx --index IX ...

The base commit is checked out into a temporary worktree and laid out as the installed package would be
(`latenthash` with its `server` and `export` subpackages), put first on PYTHONPATH so that it wins over this
checkout's editable install; each commit runs its own copy of the benchmark script (the scripts import the package's
names of their day). Rounds alternate head and base, so a machine that slows down slows both. Each run's
results/RESULT.json is read back; `--rows` names the dict of rows (row name -> figures) inside its "result".
Prints every row's per-round medians and head/base ratios, and saves results/ab_RESULT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import OUT, save

ROOT = Path(__file__).resolve().parent.parent


def overlay(commit: str, where: Path) -> Path:
    """`commit` checked out under `where`, its package laid out as site-packages would hold it in where/site."""
    tree = where / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit], check=True,
                   capture_output=True)
    pkg = where / "site" / "latenthash"
    shutil.copytree(tree / "sdk", pkg)
    for sub in ("server", "export"):
        shutil.copytree(tree / sub, pkg / sub)
    return tree


def run_once(root: Path, script: list[str], result: str, rows: str, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, *script], check=True, env=env, cwd=root)
    return json.loads((root / OUT.relative_to(ROOT) / f"{result}.json").read_text())["result"][rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the commit to compare against")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--result", required=True, help="the name the benchmark saves its results under")
    ap.add_argument("--rows", required=True, help="the key of the row dict in its result")
    ap.add_argument("script", nargs=argparse.REMAINDER, help="-- the benchmark and its arguments")
    args = ap.parse_args()
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    base_sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.base], check=True,
                              capture_output=True, text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="latenthash-ab-"))
    try:
        tree = overlay(args.base, tmp)
        runs: dict[str, list[dict]] = {"base": [], "head": []}
        for _ in range(args.rounds):
            runs["head"].append(run_once(ROOT, script, args.result, args.rows, None))
            runs["base"].append(run_once(tree, script, args.result, args.rows, str(tmp / "site")))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "tree")],
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    table = {}
    print(f"\n| row | base {base_sha} | head | head / base |\n|---|---|---|---|")
    for row in runs["head"][0]:
        figures = {}
        for field in runs["head"][0][row]:
            if not isinstance(runs["head"][0][row][field], (int, float)):
                continue
            b = statistics.median(r[row][field] for r in runs["base"])
            h = statistics.median(r[row][field] for r in runs["head"])
            figures[field] = {"base": b, "head": h, "ratio": h / b if b else float("nan")}
        table[row] = figures
        main_field = "qps" if "qps" in figures else next(iter(figures))
        f = figures[main_field]
        print(f"| {row} {main_field} | {f['base']:,.2f} | {f['head']:,.2f} | {f['ratio']:.3f} |")
    print("saved", save(f"ab_{args.result}", {"base": base_sha, "rounds": args.rounds, "script": script,
                                              "rows": table}))


if __name__ == "__main__":
    main()
