"""DeltaNMF: two-stage neural NMF for gene programs in case-control single-cell data."""
from .api import DeltaNMFResult, fit_onestage, fit_twostage
from .data import simulate_case_control, simulation_truth

__version__ = "0.1.0"
__all__ = ["DeltaNMFResult", "fit_onestage", "fit_twostage", "simulate_case_control", "simulation_truth",
           "__version__"]

import warnings as _warnings

# Lightning calls a torch API that torch itself deprecated; nothing a user can act on.
_warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
