"""Gene-similarity resources: loading, aligning to a dataset, building from embeddings."""
from .similarity import (EmbeddingResource, FileResource, Resource, id_convention, read_gene_list,
                         similarity_from_embeddings, strip_version)

__all__ = ["EmbeddingResource", "FileResource", "Resource", "id_convention", "read_gene_list",
           "similarity_from_embeddings", "strip_version"]
