"""Command line for building gene-similarity resources: ``python -m deltanmf.resources``.

Examples
--------
::

    python -m deltanmf.resources scgpt --model-dir scGPT_human --gene-info gene_info.csv --out resources/scgpt
    python -m deltanmf.resources transcriptformer --h5 tf_sapiens_gene_embeddings.h5 --out resources/tf --knn 50
    python -m deltanmf.resources embeddings --matrix E.npy --genes genes.json --out resources/mine
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..errors import InputError
from .build import DENSE_NAME, GENES_NAME, KNN_NAME, build

PROG = "python -m deltanmf.resources"

_EPILOG = (f"Writes {DENSE_NAME} (dense float32 genes x genes) or, with --knn, {KNN_NAME} (scipy sparse), "
           f"plus {GENES_NAME} (the genes in row order). Use them with resource=custom "
           "resource.matrix=OUT/<matrix file> resource.genes=OUT/genes_order.json.")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_output_options(command: argparse.ArgumentParser) -> None:
    # Added after each source's own inputs so that those come first in the usage line.
    group = command.add_argument_group("output options")
    group.add_argument("--out", required=True, metavar="DIR",
                       help="output directory (created if needed); existing resource files are replaced")
    group.add_argument("--knn", type=_positive_int, metavar="K",
                       help="keep only each gene's K strongest positive similarities, symmetrised, and write a "
                            "sparse matrix; default: the full dense matrix")
    group.add_argument("--block-size", type=_positive_int, default=2048, metavar="N",
                       help="rows of S computed at a time; lower it to save memory (default: %(default)s)")
    group.add_argument("-q", "--quiet", action="store_true", help="do not log loading details")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one subcommand per embedding source.

    Returns
    -------
    argparse.ArgumentParser
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Build a gene-gene similarity resource S = max(0, corr(E)) (zero diagonal) from a "
                    "foundation model's gene embeddings E, for the Laplacian prior of deltanmf.",
        epilog=_EPILOG,
    )
    sub = parser.add_subparsers(dest="kind", required=True, metavar="{scgpt,transcriptformer,embeddings}")

    scgpt = sub.add_parser(
        "scgpt", help="an scGPT model directory",
        description="Gene embeddings of a released scGPT model: the gene encoder's output "
                    "LayerNorm(embedding) for each vocabulary token. Special tokens and symbols without an "
                    "Ensembl ID are dropped; IDs lose their version suffix.",
        epilog=_EPILOG)
    scgpt.add_argument("--model-dir", required=True, metavar="DIR",
                       help="scGPT model directory with best_model.pt, vocab.json and args.json")
    scgpt.add_argument("--gene-info", required=True, metavar="CSV",
                       help="CSV mapping gene symbols to Ensembl IDs, with columns feature_name (symbol) and "
                            "feature_id (Ensembl ID)")
    _add_output_options(scgpt)

    tf = sub.add_parser(
        "transcriptformer", help="TranscriptFormer's per-gene embedding HDF5",
        description="Released TranscriptFormer gene embeddings: an HDF5 file with a 'keys' dataset of "
                    "Ensembl IDs and an 'arrays' group with one vector per ID. Each dimension is z-scored "
                    "across genes before correlating; IDs lose their version suffix.",
        epilog=_EPILOG)
    tf.add_argument("--h5", required=True, metavar="FILE", help="the gene embedding HDF5 file")
    _add_output_options(tf)

    emb = sub.add_parser(
        "embeddings", help="any model: a matrix file plus a gene list",
        description="Gene embeddings of any model: a genes x dims matrix and the genes in row order. IDs "
                    "are used as given, so they must match the data's var_names.",
        epilog=_EPILOG)
    emb.add_argument("--matrix", required=True, metavar="FILE",
                     help="the embedding matrix: .npy, or .csv (comma) or .tsv / .txt (tab) with numbers "
                          "only -- no header row, no gene-ID column")
    emb.add_argument("--genes", required=True, metavar="FILE",
                     help="the genes in row order: a .json list, or plain text with one ID per line")
    _add_output_options(emb)
    return parser


def _inputs(args: argparse.Namespace) -> dict[str, str]:
    if args.kind == "scgpt":
        return {"model_dir": args.model_dir, "gene_info": args.gene_info}
    if args.kind == "transcriptformer":
        return {"h5": args.h5}
    return {"matrix": args.matrix, "genes": args.genes}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        0 on success, 2 when the input is unusable (the message goes to stderr, without a
        traceback, since it is about the user's files rather than a bug).
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="deltanmf.resources: %(message)s", stream=sys.stderr)
    try:
        built = build(args.kind, args.out, knn=args.knn, block_size=args.block_size, **_inputs(args))
    except InputError as exc:
        print(f"deltanmf.resources: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if built.knn is None:
        print(f"wrote a dense similarity resource: {built.n_genes} genes ({built.n_dims}-dim {args.kind} "
              f"embedding), {built.density:.1%} of entries non-zero")
    else:
        print(f"wrote a k-NN similarity resource (k={built.knn}): {built.n_genes} genes ({built.n_dims}-dim "
              f"{args.kind} embedding), {built.nnz} non-zeros, density {built.density:.4%}")
    for path in built.paths:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
