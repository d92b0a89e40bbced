"""Stage 1: the baseline programs of the control cells."""
from __future__ import annotations

import torch

from ..nmf import Activation, GeneGraph, LossTerms, NeuralNMF
from ..nmf.losses import laplacian_penalty, reconstruction_loss
from .base import NMFStageModule


class Stage1Module(NMFStageModule):
    """Neural NMF of the control cells: ``X_ctrl ~ W_base H``.

    Loss: ``mean((X - W H)^2) + alpha * tr(W^T L W) / (n_genes K)``, the second term only
    with a gene graph, switched on late (see :class:`~deltanmf.stages.base.NMFStageModule`).

    Parameters
    ----------
    programs, usage
        Initial W (genes x K) and usage (cells x K), e.g. from the consensus initialisation.
    activation, beta
        Non-negative map (``"softplus"`` with sharpness ``beta``, or ``"relu"``).
    lr
        Adam learning rate.
    graph
        Gene-gene similarity over the same genes, or None.
    rel_alpha
        Relative strength of the Laplacian term.
    laplacian_steps
        Steps trained with the Laplacian term on.
    minibatch
        Train on batches of cells (usage updated lazily, only for the batch's cells).
    """

    def __init__(self, programs: torch.Tensor, usage: torch.Tensor, *, activation: str = "softplus",
                 beta: float = 5.0, lr: float = 0.01, graph: GeneGraph | None = None, rel_alpha: float = 0.0,
                 laplacian_steps: int = 200, minibatch: bool = False):
        super().__init__(graph=graph, lr=lr, rel_alpha=rel_alpha, laplacian_steps=laplacian_steps)
        self.save_hyperparameters(dict(activation=activation, beta=beta, lr=lr, rel_alpha=rel_alpha,
                                       laplacian_steps=laplacian_steps, minibatch=minibatch))
        self.model = NeuralNMF(programs, usage, Activation(activation, beta), sparse_usage_grad=minibatch)

    def loss_terms(self, x: torch.Tensor, index: torch.Tensor) -> LossTerms:
        programs = self.model.programs()
        recon = reconstruction_loss(x, programs, self.model.usage(index))
        if self.graph is None:
            return LossTerms(total=recon, recon=recon)
        laplacian = laplacian_penalty(self.graph, programs)
        # In minibatch mode the batch's mean reconstruction is an unbiased estimate of
        # the full one, so the prior keeps its full weight and every batch's loss
        # estimates the full objective (weighting both terms by the batch's share of
        # cells would sum to it exactly over an epoch; Adam ignores that constant).
        total = recon + self.prior_strength(recon, laplacian) * laplacian
        return LossTerms(total=total, recon=recon, laplacian=laplacian)
