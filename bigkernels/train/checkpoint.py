"""Checkpoints that resume a run exactly: model, optimizer, scheduler, GradScaler, the position in
the data (epoch and batch; the order itself is a function of seed and epoch, see data.py), every
random number generator (torch CPU and CUDA, Python, NumPy) and the step.

Files are written to a temporary name and renamed, so a run killed while saving leaves the previous
checkpoint intact. `latest.pt` in the directory is always the newest one.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Optional

import torch

LATEST = "latest.pt"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def step_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def save(directory: str | os.PathLike, step: int, state: dict[str, Any]) -> Path:
    """Write `state` as step_<step>.pt and latest.pt in `directory`; returns the step file's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = step_path(directory, step)
    for target in (path, directory / LATEST):
        tmp = target.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, target)
    return path


def find(resume: bool | str | os.PathLike, directory: Optional[str | os.PathLike]) -> Optional[Path]:
    """The checkpoint to resume from: `resume` itself when it is a path; with resume=True, latest.pt
    in `directory` when there is one (a fresh start otherwise); None with resume=False."""
    if resume is False or resume is None:
        return None
    if resume is True:
        if directory is None:
            raise ValueError("fit: resume=True needs checkpoint_dir (where latest.pt is looked for)")
        latest = Path(directory) / LATEST
        return latest if latest.exists() else None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"fit: resume checkpoint {path} does not exist")
    return path


def load(path: str | os.PathLike, device: torch.device) -> dict[str, Any]:
    # weights_only=False: the state holds Python and NumPy RNG states, which the safe loader refuses.
    # Only load checkpoints you wrote.
    return torch.load(path, map_location=device, weights_only=False)
