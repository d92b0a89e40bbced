"""The neural NMF as a plain torch module: parameters, activation and loss terms."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .activation import Activation
from .losses import GeneGraph, laplacian_penalty, reconstruction_loss


class NeuralNMF(nn.Module):
    """Programs ``W = [W_fixed, phi(W_raw)]`` (genes x K) and usage ``phi(U_raw)`` (cells x K).

    Usage is stored cells x K (the transpose of H) so a batch of cells is a row lookup;
    with ``sparse_usage_grad`` that lookup yields a sparse gradient touching only the
    batch's rows (see :class:`deltanmf.core.optim.LazyAdam`).

    Parameters
    ----------
    programs, usage
        Initial non-negative values, genes x K and cells x K.
    activation
        The non-negative map; parameters are initialised through its inverse.
    sparse_usage_grad
        Use sparse gradients for usage (minibatch training).
    fixed_programs
        Programs that are part of W but never trained (stage 2's frozen baseline): a
        buffer, used exactly as given (no activation), placed before the trainable ones.
    """

    def __init__(self, programs: torch.Tensor, usage: torch.Tensor, activation: Activation,
                 sparse_usage_grad: bool = False, fixed_programs: torch.Tensor | None = None):
        super().__init__()
        n_fixed = 0 if fixed_programs is None else fixed_programs.shape[1]
        if programs.shape[1] + n_fixed != usage.shape[1]:
            raise ValueError(f"programs have {programs.shape[1] + n_fixed} columns but usage has {usage.shape[1]}")
        if fixed_programs is not None and fixed_programs.shape[0] != programs.shape[0]:
            raise ValueError(f"fixed programs have {fixed_programs.shape[0]} genes, trainable ones {programs.shape[0]}")
        self.activation = activation
        self.sparse_usage_grad = sparse_usage_grad
        self.register_buffer("fixed_programs", None if fixed_programs is None else fixed_programs.detach().clone())
        self.programs_raw = nn.Parameter(activation.inverse(programs.detach().float()))
        self.usage_raw = nn.Parameter(activation.inverse(usage.detach().float()))

    @property
    def n_programs(self) -> int:
        return self.usage_raw.shape[1]

    def trainable_programs(self) -> torch.Tensor:
        """The trained part of W, genes x (K - fixed)."""
        return self.activation(self.programs_raw)

    def programs(self) -> torch.Tensor:
        """W, genes x K (fixed programs first)."""
        trained = self.trainable_programs()
        if self.fixed_programs is None:
            return trained
        return torch.cat([self.fixed_programs, trained], dim=1)

    def usage(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Usage of the cells in ``index`` (all cells when None), cells x K."""
        if index is None:
            return self.activation(self.usage_raw)
        raw = F.embedding(index, self.usage_raw, sparse=self.sparse_usage_grad)
        return self.activation(raw)

    def recon(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return reconstruction_loss(x, self.programs(), self.usage(index))

    def laplacian(self, graph: GeneGraph) -> torch.Tensor:
        return laplacian_penalty(graph, self.programs())
