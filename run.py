"""The single entry point: compose the config, validate it, run the task.

python run.py                                   # train the tokenizer on CoinRun
python run.py model=dynamics trainer=ddp        # any group, any override
python run.py task=eval checkpoint=PATH data=atari
python run.py -m cluster=slurm model.lr=1e-4,3e-4
"""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from worldmodel.config import validate
    from worldmodel.tasks import run_task

    validate(cfg)
    return run_task(cfg)


if __name__ == "__main__":
    main()
