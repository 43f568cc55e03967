"""Training utilities: optimize() (swap stock layers for bigkernels modules), fit() (a compact loop
with AMP, accumulation, clipping, schedulers, evaluation, exact-resume checkpoints, metrics log and
DDP under torchrun), knowledge distillation and fine-tuning helpers."""
from bigkernels.train.distill import distillation_loss, distillation_step
from bigkernels.train.finetune import freeze, param_groups, unfreeze
from bigkernels.train.loop import FitResult, evaluate, fit
from bigkernels.train.swap import SWAP_RULES, OptimizeReport, SwapRule, optimize

__all__ = [
    "FitResult",
    "OptimizeReport",
    "SWAP_RULES",
    "SwapRule",
    "distillation_loss",
    "distillation_step",
    "evaluate",
    "fit",
    "freeze",
    "optimize",
    "param_groups",
    "unfreeze",
]
