"""The single entry point: compose the config, validate it, run the task.

python run.py                                   # train the tokenizer on CoinRun
python run.py model=dynamics trainer=ddp        # any group, any override
python run.py task=eval checkpoint=PATH data=atari
python run.py --help                            # tasks, config groups, recipes, examples
python run.py experiment=demo task=check        # every stage's config, validated; trains nothing
python run.py experiment=demo debug=tiny        # any recipe shrunk to run end to end in minutes
python run.py -m experiment=smoke_tokenizer search=optuna   # a hyper-parameter search (Optuna)
python run.py -m cluster=slurm optim.lr=1e-4,3e-4
torchrun --nproc_per_node=4 run.py trainer=gpu  # the processes share one run folder
"""

import hydra
from omegaconf import DictConfig

from worldmodel.config import validate
from worldmodel.tasks import run_task
from worldmodel.train.dist import share_run_stamp


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    validate(cfg)
    return run_task(cfg)


if __name__ == "__main__":
    share_run_stamp()  # under torchrun, before Hydra makes the run folder
    main()
