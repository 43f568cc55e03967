"""Run by tests/test_distributed.py, under torchrun (N processes) or directly (one process): trains
a small LSTM classifier, swapped to bigkernels.nn.LSTM by bigkernels.optimize, with fit(), and saves
the final parameters (process 0) to --out. Not collected by pytest (no test_ prefix)."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import bigkernels
from bigkernels import train


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, 3, generator=gen)
    return TensorDataset(x, (x.sum(dim=(1, 2)) > 0).long())


def run(batch_size: int, steps: int, accumulation: int, checkpoint_dir: str | None = None,
        log_path: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = bigkernels.optimize(Classifier()).model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    train.fit(model, optimizer, dataset(), batch_size=batch_size, max_steps=steps, accumulation_steps=accumulation,
              loss_fn=F.cross_entropy, max_grad_norm=1.0, checkpoint_dir=checkpoint_dir, log_path=log_path, log_every=1)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="per process")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--metrics-log")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two processes on a shared 2-core machine
    model = run(args.batch_size, args.steps, args.accumulation, args.checkpoint_dir, args.metrics_log)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        torch.save({name: p.detach() for name, p in model.named_parameters()}, args.out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
