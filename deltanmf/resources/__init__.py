"""Gene-similarity resources: loading, aligning to a dataset, building from embeddings."""
from .similarity import FileResource, read_gene_list, similarity_from_embeddings

__all__ = ["FileResource", "read_gene_list", "similarity_from_embeddings"]
