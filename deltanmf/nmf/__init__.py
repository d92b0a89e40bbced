"""Pure torch: parametrisation, losses, regularisers, NNLS and the consensus initialisation."""
from .activation import Activation
from .consensus import ConsensusResult, consensus_init, refit_usage
from .losses import (GeneGraph, LossTerms, adaptive_strength, laplacian_penalty, orthogonality_penalty,
                     reconstruction_loss)
from .matrix import CellMatrix
from .metrics import cosine_matrix, matched_cosine
from .model import NeuralNMF
from .nnls import nnls_gram, nnls_programs, nnls_usage
from .optim import LazyAdam

__all__ = [
    "Activation", "CellMatrix", "ConsensusResult", "GeneGraph", "LazyAdam", "LossTerms", "NeuralNMF",
    "adaptive_strength", "consensus_init", "cosine_matrix", "laplacian_penalty", "matched_cosine",
    "nnls_gram", "refit_usage", "nnls_programs", "nnls_usage", "orthogonality_penalty", "reconstruction_loss",
]
