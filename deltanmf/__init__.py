"""DeltaNMF: two-stage neural NMF for gene programs in case-control single-cell data.

The package is laid out by job, each layer importing only the ones below it:

- :mod:`deltanmf.errors`, :mod:`deltanmf.settings`, :mod:`deltanmf.files`: the errors users
  see, the typed settings, writing files atomically;
- :mod:`deltanmf.core`: the math, in pure torch;
- :mod:`deltanmf.data`: reading and preparing cells (in memory or streamed), the simulator;
- :mod:`deltanmf.resources`: gene-similarity resources, built and loaded;
- :mod:`deltanmf.train`: Lightning wiring (modules, data module, callbacks, trainer);
- :mod:`deltanmf.tl`: analysis with plain arguments (fits, case-control statistics, K selection);
- :mod:`deltanmf.pl`: figures;
- :mod:`deltanmf.workflow`: the edge (Hydra config -> settings -> fits -> files, the Python API).

Importing the package loads nothing heavy; the names below load on first use.
``deltanmf.project`` is the function :func:`deltanmf.tl.project.project` (its command line is
the module ``python -m deltanmf.project``, which, once imported, is callable the same way).
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "DeltaNMFResult": "deltanmf.workflow.api",
    "fit_onestage": "deltanmf.workflow.api",
    "fit_twostage": "deltanmf.workflow.api",
    "project": "deltanmf.tl.project",
    "simulate_case_control": "deltanmf.data.simulate",
    "simulation_truth": "deltanmf.data.simulate",
    "default_settings": "deltanmf.workflow.config",
    "InputError": "deltanmf.errors",
}
__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deltanmf' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups find it directly
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
