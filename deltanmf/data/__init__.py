"""Reading, splitting, filtering and normalising cells; the demo data; the DataModule."""
from .backed import H5adFile, H5adRows, open_h5ad, prepare_backed
from .datamodule import CellDataModule
from .demo import demo_path
from .errors import InputError
from .prepare import PreparedData, prepare, read_h5ad, split_conditions
from .simulate import SimulationTruth, simulate_case_control, simulation_truth

__all__ = [
    "CellDataModule", "H5adFile", "H5adRows", "InputError", "PreparedData", "SimulationTruth", "demo_path",
    "open_h5ad", "prepare", "prepare_backed", "read_h5ad",
    "simulate_case_control", "simulation_truth", "split_conditions",
]
