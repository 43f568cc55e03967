"""Shared by the examples: train a model as written (stock layers) and after bigkernels.optimize,
from the same initial weights and data order, and print one line each.

Not a library: each example keeps its model and data in its own file, where a reader looks."""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import bigkernels
from bigkernels import train


@dataclass
class Outcome:
    variant: str
    accuracy: float
    seconds: float
    swapped: int


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def parser(description: str, steps: int, tiny_steps: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help=f"a smoke run ({tiny_steps} steps, small data): what CI runs")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {steps}; {tiny_steps} with --tiny)")
    p.add_argument("--variant", choices=("both", "stock", "optimized"), default="both")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(default_steps=steps, tiny_steps=tiny_steps)
    return p


def steps_of(args: argparse.Namespace) -> int:
    return args.steps or (args.tiny_steps if args.tiny else args.default_steps)


def compare(
    make_model: Callable[[], nn.Module],
    train_set: Dataset,
    test_set: Dataset,
    args: argparse.Namespace,
    *,
    batch_size: int,
    lr: float,
) -> list[Outcome]:
    """Train the stock model and its optimized twin (same initial weights, same batches); returns
    the test accuracy and training time of each."""
    torch.manual_seed(args.seed)
    initial = make_model().to(args.device)
    variants = ("stock", "optimized") if args.variant == "both" else (args.variant,)
    outcomes = []
    for variant in variants:
        model = copy.deepcopy(initial)
        swapped = 0
        if variant == "optimized":
            report = bigkernels.optimize(model)
            model, swapped = report.model, len(report.swapped)
            if _rank() == 0:
                print(report)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps = steps_of(args)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        train.fit(model, optimizer, train_set, batch_size=batch_size, max_steps=steps, loss_fn=F.cross_entropy,
                  scheduler=scheduler, precision=args.precision, max_grad_norm=1.0, seed=args.seed)
        seconds = time.perf_counter() - start
        metrics = train.evaluate(model, test_set, batch_size=256, loss_fn=F.cross_entropy, precision=args.precision)
        outcomes.append(Outcome(variant, metrics["eval_accuracy"], seconds, swapped))
    return outcomes


def report(outcomes: list[Outcome], target: float, args: argparse.Namespace) -> int:
    """Print the results (process 0 only under torchrun); exit status 1 when a full run misses the
    stated accuracy."""
    if _rank() == 0:
        for o in outcomes:
            print(f"{o.variant:>9}: test accuracy {o.accuracy:.3f} (target {target:.2f}), "
                  f"training {o.seconds:.1f} s, {o.swapped} layers swapped")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if args.tiny:
        return 0
    return 0 if all(o.accuracy >= target for o in outcomes) else 1
