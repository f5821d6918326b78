"""Train with Lightning's CLI: SFT, reward model, DPO or PPO, chosen by the config's ``model.class_path``.

    python src/train.py fit --config conf/sft.yaml                 # one machine (CPU or GPU)
    python src/train.py fit --config conf/dpo.yaml --trainer.devices 8 --trainer.strategy deepspeed_stage_2
    python src/train.py fit --config conf/sft.yaml --print_config  # the complete resolved config
    tensorboard --logdir runs

On several nodes, launch the same command on every node with the usual ``MASTER_ADDR``, ``MASTER_PORT``,
``NODE_RANK`` environment (or under SLURM) and ``--trainer.num_nodes N``.
"""

import sys

from vlalign.cli import ConfigError, main

if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:  # a config value refused at start-up: the message names the key
        sys.exit(f"error: {e}")
