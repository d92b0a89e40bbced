"""Programs onto new cells, on the command line:
``python -m deltanmf.project SOURCE data.h5ad out.h5ad``.

``SOURCE`` is a finished run directory (or its ``results.h5ad``) or a programs file (a
cNMF/starCAT spectra ``.tsv``/``.txt``, a genes x programs ``.csv``/``.tsv``, an ``.h5ad``
with ``--varm-key``). ``out.h5ad`` is ``data.h5ad`` with the usage in
``.obsm["X_deltanmf"]`` and the program names in ``.uns["deltanmf"]``; the usage is also
written as ``out.usage.csv``. The analysis is :func:`deltanmf.tl.project.project`.

In Python, ``deltanmf.project(adata, source)`` is that function. Importing this module by
name (``import deltanmf.project``) would bind ``deltanmf.project`` to the module instead, so
the module is made callable: ``deltanmf.project(adata, source)`` works either way.
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

from .errors import InputError


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m deltanmf.project SOURCE DATA OUT [options]``; exit 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m deltanmf.project", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a finished run directory, its results.h5ad, or a programs file")
    parser.add_argument("data", help="the .h5ad of the cells to project onto (cells x genes)")
    parser.add_argument("out", help="the .h5ad to write: DATA with .obsm['X_deltanmf'] added")
    parser.add_argument("--layer", help="layer of DATA to use (default: the matrix the run read, refused when DATA lacks it; "
                        "--no-use-raw alone: .X)")
    parser.add_argument("--use-raw", action=argparse.BooleanOptionalAction, default=None,
                        help="use DATA's .raw (default: when the run read .raw and DATA has one)")
    parser.add_argument("--gene-id-column", help="a .var column of DATA with the programs' gene IDs")
    parser.add_argument("--varm-key", help="for an .h5ad SOURCE that is not a run: the .varm key of its programs")
    parser.add_argument("--units", default="auto", choices=("auto", "expression", "scaled"),
                        help="units of a programs file (default auto: spectra layout scaled, others expression)")
    parser.add_argument("--normalize", choices=("none", "total", "median"),
                        help="cell normalisation (default: the run's; none for a programs file)")
    parser.add_argument("--min-coverage", type=float, default=0.5,
                        help="least share of the programs' genes DATA must have (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=10_000, help="cells per NNLS block (default 10000)")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    try:
        out = Path(args.out)
        if out.suffix != ".h5ad":
            raise InputError(f"out: {out} must end in .h5ad")
        if not out.parent.exists():
            raise InputError(f"out: the folder {out.parent} does not exist")
        from .data.read import read_h5ad
        from .files import atomic_write
        from .tl.project import project

        adata = read_h5ad(args.data)
        usage = project(adata, args.source, layer=args.layer, use_raw=args.use_raw, gene_id_column=args.gene_id_column,
                        varm_key=args.varm_key, units=args.units, normalize=args.normalize,
                        min_coverage=args.min_coverage, batch_size=args.batch_size, device=args.device)
        atomic_write(out, adata.write_h5ad)
        table = out.with_suffix(".usage.csv")
        atomic_write(table, lambda tmp: usage.rename_axis("cell").to_csv(tmp))
    except InputError as err:
        print(f"deltanmf: error: {err}", file=sys.stderr)
        return 2
    print(f"{usage.shape[1]} programs projected onto {usage.shape[0]} cells: {out} (.obsm['X_deltanmf']), {table}")
    return 0


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`deltanmf.tl.project.project`."""

    def __call__(self, *args, **kwargs):
        from .tl.project import project

        return project(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
