"""Lightning wiring: the stages' LightningModules, the cells' DataModule and samplers, the
callbacks (Lightning's EarlyStopping, ModelCheckpoint and OnExceptionCheckpoint with the
extra guards), and building and running a stage's Trainer."""
from .callbacks import ConvergenceStop, ProgressBar
from .checkpoint import AtomicCheckpointIO, InterruptCheckpoint, TrainingInterrupted
from .datamodule import CellDataModule
from .modules import WINDOW_LOSS, NMFStageModule, Stage1Module, Stage2Module
from .trainer import Resume, TrainingPlan, build_trainer, check_trainer, fit_module

__all__ = ["AtomicCheckpointIO", "CellDataModule", "ConvergenceStop", "InterruptCheckpoint", "NMFStageModule",
           "ProgressBar", "Resume", "Stage1Module", "Stage2Module", "TrainingInterrupted", "TrainingPlan",
           "WINDOW_LOSS", "build_trainer", "check_trainer", "fit_module"]
