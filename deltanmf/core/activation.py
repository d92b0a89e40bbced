"""Non-negative activations that map unconstrained parameters to programs and usage.

The neural NMF keeps ``W = phi(W_raw)`` and ``H = phi(H_raw)``; training then runs an
unconstrained optimiser (Adam) on the raw tensors. Each activation has an inverse so a
consensus-NMF initialisation can be loaded exactly: ``phi(inverse(V)) == V``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Values below this are lifted before inversion: softplus never reaches 0, and a ReLU
# parameter sitting exactly at 0 would receive no gradient and stay dead for ever.
_FLOOR = 1e-6


class Activation:
    """A non-negative map ``phi`` with its inverse.

    Parameters
    ----------
    kind
        ``"softplus"`` (``log(1 + exp(beta x)) / beta``) or ``"relu"``.
    beta
        Sharpness of the softplus; larger values approach ReLU. Ignored for ReLU.
    """

    kinds = ("softplus", "relu")

    def __init__(self, kind: str, beta: float):
        if kind not in self.kinds:
            raise ValueError(f"activation must be one of {self.kinds}, got {kind!r}")
        if kind == "softplus" and not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"softplus beta must be > 0, got {beta}")
        self.kind = kind
        self.beta = float(beta)

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        if self.kind == "relu":
            return F.relu(raw)
        # threshold=20 is torch's default switch to the identity for large beta*x
        return F.softplus(raw, beta=self.beta)

    def inverse(self, value: torch.Tensor) -> torch.Tensor:
        """Raw tensor whose activation equals ``value`` (values below 1e-6 are lifted to it)."""
        value = value.clamp_min(_FLOOR)
        if self.kind == "relu":
            return value.clone()
        bx = self.beta * value
        # log(expm1(y)) written as y + log(-expm1(-y)) to stay finite for large y
        return (bx + torch.log(-torch.expm1(-bx))) / self.beta

    def __repr__(self) -> str:
        return f"Activation({self.kind!r}, beta={self.beta})"
