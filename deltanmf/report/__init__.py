"""Result tables, files and (later) case-control statistics and plots."""
from .outputs import results_anndata, standard_files, top_genes_table, write_outputs

__all__ = ["results_anndata", "standard_files", "top_genes_table", "write_outputs"]
