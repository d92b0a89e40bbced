"""DeltaNMF command line: ``python train.py [group=option ...] [key=value ...]`` (see README)."""
import sys

import hydra
from omegaconf import DictConfig

from deltanmf.workflow.main import check_command_line, main


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def train(cfg: DictConfig) -> float:
    return main(cfg)


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    train()
