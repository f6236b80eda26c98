"""`lav2 train`: the stages `pretrain`, `finetune` and `joint` in one readable loop.

    setup.py        recipe -> engine (frozen base + adapter) -> groups -> streams -> AdamW + schedule
    groups.py       which adapter tensors each stream trains, at which learning rate
    fit.py          the Trainer: set up by setup.py's steps, then the loop (run, train_step)
    checkpoint.py   the run directory: artifact, trainer state, metrics, recipe; save and restore
    features.py     images: the encoder's feature cache, train.standardize_features
    distributed.py  several processes under torchrun (DDP-style sums, FSDP2 shards)

The command holds the run directory (`claim_run`), runs `resolve` (the recipe), `prepare_out`
(the run directory), then `Trainer(...).run()`.
"""

from lav2cli.train.checkpoint import claim_run, prepare_out
from lav2cli.train.fit import RunInfo, Trainer
from lav2cli.train.groups import IMAGE_TEXT, INSTRUCTION, STAGE_GROUPS, group_of, make_groups, make_optimizer
from lav2cli.train.setup import resolve

__all__ = ["IMAGE_TEXT", "INSTRUCTION", "STAGE_GROUPS", "RunInfo", "Trainer", "claim_run", "group_of",
           "make_groups", "make_optimizer", "prepare_out", "resolve"]
