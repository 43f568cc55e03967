"""A Transformer encoder classifier on a deterministic synthetic task, trained as written (stock
nn.TransformerEncoder) and again after bigkernels.optimize, from the same initial weights.

Task: sequences of 16 tokens from 8 symbols, the first token a "query" symbol q in 0..3; the label
is how many times q occurs in the rest of the sequence, capped at 3 (classes 0, 1, 2, 3+). Solving
it means matching every position against the first one: what attention does.

    python examples/train_transformer_encoder.py          # 400 steps: test accuracy >= 0.90 for both
                                                          # (measured 1.000 / 1.000, CPU)
    python examples/train_transformer_encoder.py --tiny   # smoke run (CI)

bigkernels.optimize swaps each encoder layer's nn.MultiheadAttention for
bigkernels.nn.MultiheadAttention (the layer calls it with need_weights=False: the fused
flash-attention path); the report printed before training says what was swapped.
"""
from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

import _common  # examples/_common.py: the script's directory is on sys.path

TARGET_ACCURACY = 0.90
SYMBOLS, QUERIES, LENGTH, CLASSES = 8, 4, 16, 4


class EncoderClassifier(nn.Module):
    def __init__(self, d_model: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(SYMBOLS, d_model)
        self.position = nn.Parameter(torch.randn(LENGTH, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(tokens) + self.position)
        return self.head(hidden[:, 0])  # the query position reads out the answer


def query_count_task(n: int, seed: int, device: str) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, SYMBOLS, (n, LENGTH), generator=gen)
    tokens[:, 0] = torch.randint(0, QUERIES, (n,), generator=gen)
    count = (tokens[:, 1:] == tokens[:, :1]).sum(1).clamp(max=CLASSES - 1)
    return TensorDataset(tokens.to(device), count.to(device))


def main(argv: list[str] | None = None) -> int:
    args = _common.parser(__doc__.splitlines()[0], steps=400, tiny_steps=4).parse_args(argv)
    n_train = 512 if args.tiny else 8192
    train_set = query_count_task(n_train, 1, args.device)
    test_set = query_count_task(256 if args.tiny else 2048, 2, args.device)
    outcomes = _common.compare(EncoderClassifier, train_set, test_set, args, batch_size=64, lr=2e-3)
    return _common.report(outcomes, TARGET_ACCURACY, args)


if __name__ == "__main__":
    sys.exit(main())
