"""The math, in pure torch: parametrisation, losses, regularisers, NNLS, the consensus
initialisation and stage 2's start. Nothing here knows Lightning, AnnData or the configuration.

Hand-written solvers that earn their place (each says why in its module): batched NNLS
(HALS over many cells at once, sparse-friendly), accelerated multiplicative updates that
share one pass over the cells between all consensus runs, and row-lazy Adam (minibatch usage).
"""
from .activation import Activation
from .consensus import ConsensusResult, cluster_medians, consensus_init, refit_and_score, refit_usage
from .losses import (GeneGraph, LossTerms, adaptive_strength, fit_error, laplacian_penalty, orthogonality_penalty,
                     reconstruction_loss)
from .matrix import CellMatrix
from .metrics import cosine_matrix, matched_cosine, matching, normalize_programs
from .model import NeuralNMF
from .nnls import nnls_gram, nnls_programs, nnls_usage
from .optim import LazyAdam
from .replicates import ReplicateConsensus, replicate_consensus
from .stage2 import ResidualMatrix, refine_case_programs, stage2_init

__all__ = [
    "Activation", "CellMatrix", "ConsensusResult", "GeneGraph", "LazyAdam", "LossTerms", "NeuralNMF",
    "ReplicateConsensus", "ResidualMatrix", "adaptive_strength", "cluster_medians", "consensus_init", "cosine_matrix",
    "fit_error", "laplacian_penalty", "matched_cosine", "matching", "nnls_gram", "nnls_programs", "nnls_usage",
    "normalize_programs", "orthogonality_penalty", "reconstruction_loss", "refine_case_programs", "refit_and_score",
    "refit_usage",
    "replicate_consensus", "stage2_init",
]
