"""Training NoProp-DT, CT/FM and the backprop baselines.

- `config`: `TrainConfig`, the one list of methods and of update modes (and their aliases).
- `build`: the model a config describes, readied for a run (`ready_for_training`).
- `precision`: fp32 / tf32 / bf16 of a step and of evaluation (`precision_context`).
- `compiling`: the blocks of a step through torch.compile (`TrainConfig.compile`).
- `step`: the optimizers and the one step body (eager `train_step`; `captured_body` for graphs).
- `graphs`: that step captured as a CUDA graph and replayed (`CapturedStep`).
- `loop`: `fit` (epochs, evaluation, checkpoints, resume), `evaluate`, `load_model`.
- `distributed`, `dist_checkpoint`, `dist_loop`: block-parallel training over torch.distributed
  (`fit_distributed`); the `fit` and `load_model` exported here hand over to it under a process
  group or for a distributed checkpoint folder, and to `loop` otherwise (docs/distributed.md).
"""
from noprop.training.build import build_model, ready_for_training
from noprop.training.config import (CONTINUOUS, METHOD_DEFAULTS, METHODS, MODE_ALIASES, MODES, PRECISIONS,
                                    TrainConfig, blocks_per_step, canonical_mode, epoch_plan)
from noprop.training.graphs import CapturedStep
from noprop.training.dist_loop import fit, fit_distributed, load_model
from noprop.training.loop import evaluate, peak_memory_mb
from noprop.training.precision import precision_context
from noprop.training.step import Optimizers, forward_backward, train_step

__all__ = ["CONTINUOUS", "CapturedStep", "METHODS", "METHOD_DEFAULTS", "MODES", "MODE_ALIASES", "Optimizers",
           "PRECISIONS", "TrainConfig", "blocks_per_step", "build_model", "canonical_mode", "epoch_plan", "evaluate",
           "fit", "fit_distributed", "forward_backward", "load_model", "peak_memory_mb", "precision_context",
           "ready_for_training", "train_step"]
