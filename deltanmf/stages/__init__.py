"""LightningModules of the two stages and their training callbacks."""
from .convergence import ConvergenceStop
from .stage1 import Stage1Module

__all__ = ["ConvergenceStop", "Stage1Module"]
