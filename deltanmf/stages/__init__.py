"""LightningModules of the two stages and their training callbacks."""
from .base import NMFStageModule
from .convergence import ConvergenceStop, NonFiniteLossError, ProgressBar
from .stage1 import Stage1Module
from .stage2 import Stage2Module, stage2_init

__all__ = ["ConvergenceStop", "NonFiniteLossError", "ProgressBar", "NMFStageModule", "Stage1Module", "Stage2Module", "stage2_init"]
