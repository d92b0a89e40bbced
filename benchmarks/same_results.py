"""Do two versions of DeltaNMF give the same results? The demo, run by each, compared.

Runs ``train.py`` of this checkout and of another one (``--reference``, e.g. a worktree of an
earlier commit: ``git worktree add /tmp/ref <commit>``) on the demo in several modes (full batch,
minibatch, the demo's prior, replicates with the null), each in its own process with the same
demo cache, and compares the outputs: programs, usage and refitted usage (bit for bit, and the
largest difference), the case-control tables on the reference's columns (identical, or equal to
1e-6; columns added since are not compared), steps and errors. Writes
``benchmarks/results/same_results.md``.

    python benchmarks/same_results.py --reference /tmp/ref
    python benchmarks/same_results.py --reference /tmp/ref --modes "full batch" "minibatch (512)"

Leave out what a change alters on purpose: modes (``--modes``; e.g. the prior's, against a
reference from before the scale-invariant prior), tables (``--tables``) or columns
(``--skip-columns``; e.g. ``top_genes``, ranked by specificity since issue 22).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from deltanmf.files import results_dir

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "full batch": [],
    "minibatch (512)": ["data.batch_size=512"],
    "prior (resource=demo)": ["resource=demo"],
    "replicates + null (quick demo)": ["experiment=quick", "model.replicates=2", "model.null_fit=true"],
}
TABLES = ("usage_shift", "case_programs", "group_usage", "top_genes")


def run(tree: Path, out: Path, overrides: list[str], cache: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree), DELTANMF_CACHE_DIR=str(cache))
    proc = subprocess.run([sys.executable, str(tree / "train.py"), *overrides, "logger=none",
                           "trainer.enable_progress_bar=false", f"hydra.run.dir={out}"], cwd=tree, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{tree}/train.py {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")


def _fitted(result: ad.AnnData) -> np.ndarray:
    """The programs as fitted: ``deltanmf_programs`` holds them in expression units since issue 22."""
    key = "deltanmf_programs_scaled" if "deltanmf_programs_scaled" in result.varm else "deltanmf_programs"
    return np.asarray(result.varm[key])


def _matrix(a: np.ndarray, b: np.ndarray) -> str:
    if a.shape != b.shape:
        return f"shapes differ {a.shape} vs {b.shape}"
    return "identical" if np.array_equal(a, b) else f"max difference {float(np.max(np.abs(a - b))):.2e}"


def _table(a: Path, b: Path, skip: tuple[str, ...] = ()) -> str:
    left, right = pd.read_csv(a), pd.read_csv(b)
    columns = [c for c in right.columns if c in left.columns and c not in skip]  # the reference's columns
    left, right = left[columns], right[columns]
    try:
        pd.testing.assert_frame_equal(left, right, check_exact=True)
        return "identical"
    except AssertionError:
        try:
            pd.testing.assert_frame_equal(left, right, rtol=1e-6)
            return "equal to 1e-6"
        except AssertionError as err:
            return "DIFFERENT: " + str(err).splitlines()[0]


def compare(new: Path, old: Path, tables=TABLES, skip: tuple[str, ...] = ()) -> dict:
    new, old = results_dir(new), results_dir(old)  # the reference may predate results/
    rn, ro = ad.read_h5ad(new / "results.h5ad"), ad.read_h5ad(old / "results.h5ad")
    row = {"programs": _matrix(_fitted(rn), _fitted(ro)),
           "usage": _matrix(rn.obsm["X_deltanmf"], ro.obsm["X_deltanmf"])}
    if "X_deltanmf_refit" in ro.obsm:
        row["refitted usage"] = _matrix(rn.obsm["X_deltanmf_refit"], ro.obsm["X_deltanmf_refit"])
    for table in tables:
        if (old / f"{table}.csv").exists():
            row[table] = _table(new / f"{table}.csv", old / f"{table}.csv", skip)
    mn, mo = (json.loads((d / "metrics.json").read_text()) for d in (new, old))
    for stage in ("stage1", "stage2"):
        if stage in mo:
            row[f"{stage} steps"] = f"{mn[stage]['steps']} / {mo[stage]['steps']}"
            row[f"{stage} error"] = f"{mn[stage]['relative_error']:.6f} / {mo[stage]['relative_error']:.6f}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="another checkout of DeltaNMF (its train.py is run)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "same_results.md"))
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="modes to compare")
    parser.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES), help="tables to compare")
    parser.add_argument("--skip-columns", nargs="+", default=[], help="table columns a change alters on purpose")
    args = parser.parse_args()
    reference = Path(args.reference).resolve()
    commit = subprocess.run(["git", "-C", str(reference), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    rows = {}
    with tempfile.TemporaryDirectory(prefix="deltanmf-same-") as scratch:
        scratch = Path(scratch)
        for i, mode in enumerate(args.modes):
            overrides = MODES[mode]
            run(ROOT, scratch / f"new{i}", overrides, scratch / "cache")
            run(reference, scratch / f"old{i}", overrides, scratch / "cache")
            rows[mode] = compare(scratch / f"new{i}", scratch / f"old{i}", args.tables,
                                 tuple(args.skip_columns))
            print(mode, rows[mode], flush=True)
    columns = list(dict.fromkeys(k for row in rows.values() for k in row))
    chosen = ""
    if args.modes != list(MODES):
        chosen += " --modes " + " ".join(f'"{m}"' for m in args.modes)
    if args.tables != list(TABLES):
        chosen += " --tables " + " ".join(args.tables)
    if args.skip_columns:
        chosen += " --skip-columns " + " ".join(args.skip_columns)
    lines = [f"Command: `python benchmarks/same_results.py --reference <checkout of {commit}>{chosen}` ({date.today()}).",
             "", "This checkout against the reference, on the demo; steps and errors read new / reference.", "",
             "| mode | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {mode} | " + " | ".join(row.get(c, "-") for c in columns) + " |" for mode, row in rows.items()]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
