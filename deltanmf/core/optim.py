"""Adam that updates only the rows a sparse gradient touches.

In minibatch mode each step sees the usage of a batch of cells only. Plain Adam would
keep moving every other cell's usage with its stale momentum; here a parameter with a
sparse gradient (from ``F.embedding(..., sparse=True)``) has only those rows' moments and
values updated, as in ``torch.optim.SparseAdam``. Dense gradients get standard Adam. One
optimiser serves both, so Lightning's automatic optimisation and step counting apply.
"""
from __future__ import annotations

import torch


class LazyAdam(torch.optim.Optimizer):
    """Adam for dense gradients, lazy (row-wise) Adam for sparse gradients."""

    def __init__(self, params, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if not lr > 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        # per parameter: a zero buffer that sums a sparse gradient's repeated rows (not state:
        # it is all zeros between steps, so checkpoints need not carry it)
        self._row_sums: dict[int, torch.Tensor] = {}

    def _row_gradient(self, p: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of a sparse gradient and each row's total gradient (one entry per listed row).

        ``coalesce()`` would do this, but on a GPU it reads the number of distinct rows back
        to the host, a synchronisation every step; summing into a zero buffer and reading
        the listed rows back does not.
        """
        if grad.is_coalesced():
            return grad.indices()[0], grad.values()
        rows, values = grad._indices()[0], grad._values()
        sums = self._row_sums.get(id(p))
        if sums is None or sums.shape != p.shape or sums.device != p.device:
            sums = self._row_sums[id(p)] = torch.zeros_like(p)
        sums.index_add_(0, rows, values)
        total = sums[rows]
        sums[rows] = 0
        return rows, total

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                correction1, correction2 = 1 - b1**t, 1 - b2**t
                grad = p.grad
                if grad.is_sparse:
                    rows, values = self._row_gradient(p, grad)
                    # a row listed twice gets the same values twice: the assignments below agree
                    m_rows = m[rows].mul_(b1).add_(values, alpha=1 - b1)
                    v_rows = v[rows].mul_(b2).addcmul_(values, values, value=1 - b2)
                    m[rows], v[rows] = m_rows, v_rows
                    denom = (v_rows / correction2).sqrt_().add_(eps)
                    p[rows] = p[rows] - (lr / correction1) * m_rows / denom
                else:
                    m.mul_(b1).add_(grad, alpha=1 - b1)
                    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                    denom = (v / correction2).sqrt_().add_(eps)
                    p.addcdiv_(m, denom, value=-lr / correction1)
        return loss
