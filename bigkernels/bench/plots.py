"""PNG plots of a run: one file per op / mode / device / dtype, one panel per fixed size of the
other dimensions (at most MAX_COLUMNS to a row), throughput against the op's x-axis size (e.g. the
LSTM cell's batch), one line per provider. matplotlib is optional (pip install bigkernels[bench]); without it, no plots and a note.
"""
from __future__ import annotations

import importlib.util
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from bigkernels.bench.cases import get_op
from bigkernels.bench.report import group_rows
from bigkernels.bench.runner import Row, provider_names


MAX_COLUMNS = 4  # panels per row of a figure; more panels wrap onto further rows


def matplotlib_missing() -> str | None:
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (pip install matplotlib): no PNG plots"
    return None


def _parse_shape(shape: str) -> dict[str, int]:
    return {k: int(v) for k, v in (item.split("=") for item in shape.split(","))}


def plot_file_name(op: str, mode: str, device: str, dtype: str) -> str:
    return f"{op}_{mode.replace('+', '-')}_{device}_{dtype}.png"


def write_plots(rows: Sequence[Row], out_dir: Path) -> list[Path]:
    """Write the PNGs into out_dir; returns their paths. Call only if matplotlib_missing() is None."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, works on a headless machine
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    providers = provider_names(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (op, mode, device, dtype), shapes in group_rows(rows).items():
        x_key = get_op(op).plot_x
        # panel label (the other dims) -> provider -> [(x, throughput)]
        panels: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
        for shape, by_provider in shapes.items():
            dims = _parse_shape(shape)
            x = dims.pop(x_key)
            label = ", ".join(f"{k}={v}" for k, v in dims.items())
            for provider, row in by_provider.items():
                if row.gflop_per_s is not None:
                    y = row.gflop_per_s / 1e3 if device == "cuda" else row.gflop_per_s
                    panels[label][provider].append((x, y))
        if not panels:
            continue
        unit = "TFLOP/s" if device == "cuda" else "GFLOP/s"
        cols = min(len(panels), MAX_COLUMNS)
        rows_n = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3.8 * rows_n), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, (label, lines) in zip(axes.flat, panels.items()):
            for provider in providers:
                if provider in lines:
                    xs, ys = zip(*sorted(lines[provider]))
                    ax.plot(xs, ys, marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            # Plain numbers, not 2^k / 6x10^0: the ticks are the sizes that were run.
            ax.set_xticks(sorted({x for points in lines.values() for x, _ in points}))
            ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%d"))
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ys = [y for points in lines.values() for _, y in points]
            # Label the minor ticks only when less than a decade shows, else they overlap.
            few = max(ys) / min(ys) < 10 if min(ys) > 0 else False
            ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g") if few else ticker.NullFormatter())
            ax.set_xlabel(x_key)
            ax.set_ylabel(unit)
            ax.set_title(label, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{op} {mode} on {device} ({dtype}): throughput, higher is better")
        fig.tight_layout()
        path = out_dir / plot_file_name(op, mode, device, dtype)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
