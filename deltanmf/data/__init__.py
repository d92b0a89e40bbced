"""Reading and preparing cells: in memory or streamed from disk, one preparation for both, gene
selection; the simulator and the demo; finished runs' programs and reference programs read."""
from .backed import H5adFile, H5adRows
from .demo import demo_path
from .cells import split_conditions
from .prepare import PreparedData, prepare
from .programs import Baseline, load_stage1
from .reference import ReferencePrograms, read_programs
from .read import load_input, open_h5ad, read_h5ad
from .simulate import SimulationTruth, simulate_case_control, simulation_truth

__all__ = [
    "Baseline", "H5adFile", "H5adRows", "PreparedData", "SimulationTruth", "demo_path", "load_input", "load_stage1",
    "open_h5ad", "prepare", "read_h5ad", "read_programs", "ReferencePrograms", "simulate_case_control",
    "simulation_truth", "split_conditions",
]
