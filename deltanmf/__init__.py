"""DeltaNMF: two-stage neural NMF for gene programs in case-control single-cell data."""
from .data import simulate_case_control, simulation_truth

__version__ = "0.1.0"
__all__ = ["simulate_case_control", "simulation_truth", "__version__"]
