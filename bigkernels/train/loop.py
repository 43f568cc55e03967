"""bigkernels.train.fit: a compact training loop. Not a framework: a plain function over a plain
model, optimizer and Dataset, so bigkernels modules work just as well inside Lightning or
Accelerate, which need nothing from here.

What it does, in order, for every optimizer step:
  accumulation_steps micro-batches: forward under autocast (bf16/fp16), loss / accumulation_steps,
  backward (through GradScaler for fp16; DDP gradient sync on the last micro-batch only); then
  unscale + clip (max_grad_norm), optimizer step, scheduler step (once per optimizer step), and
  when due: metrics log line, evaluation, checkpoint.
A checkpoint is taken between optimizer steps and holds everything a resumed run needs to continue
exactly as the uninterrupted one would have (checkpoint.py); on the CPU a resumed run is
bit-for-bit the same (tests/test_train.py checks it).
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from bigkernels.train import checkpoint, data, distributed

PRECISIONS: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# (model, batch) -> scalar loss. The default unpacks (inputs, targets) and applies loss_fn.
ComputeLoss = Callable[[nn.Module, Any], Tensor]


@dataclass
class FitResult:
    step: int  # optimizer steps done (counting those before a resume)
    epoch: int
    loss: Optional[float]  # mean training loss over the last logging window
    evals: list[dict[str, float]] = field(default_factory=list)  # every evaluation of this call
    checkpoint: Optional[Path] = None  # the last checkpoint written


def _default_compute_loss(loss_fn: Callable[[Any, Any], Tensor]) -> ComputeLoss:
    def compute(model: nn.Module, batch: Any) -> Tensor:
        inputs, targets = batch
        return loss_fn(model(inputs), targets)

    return compute


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    loss_fn: Optional[Callable[[Any, Any], Tensor]] = None,
    compute_loss: Optional[ComputeLoss] = None,
    precision: str = "fp32",
    device: Optional[torch.device] = None,
    collate_fn: Optional[Callable] = None,
) -> dict[str, float]:
    """Mean loss over `dataset` (``eval_loss``), and with loss_fn on (inputs, integer targets) with
    logits whose last dimension is the class, the accuracy (``eval_accuracy``). The model runs in
    eval mode and is put back in its previous mode."""
    device = device or next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    was_training = model.training
    model.eval()
    total_loss, correct, count, classified = 0.0, 0, 0, True
    try:
        for batch in loader:
            batch = data.to_device(batch, device)
            with _autocast(device, precision):
                if compute_loss is not None:
                    loss, outputs, targets = compute_loss(model, batch), None, None
                else:
                    inputs, targets = batch
                    outputs = model(inputs)
                    loss = loss_fn(outputs, targets)
            n = len(batch[0]) if isinstance(batch, (tuple, list)) else 1
            total_loss += loss.item() * n
            count += n
            if isinstance(outputs, Tensor) and isinstance(targets, Tensor) and not targets.is_floating_point():
                correct += (outputs.argmax(-1) == targets).sum().item()
            else:
                classified = False
    finally:
        model.train(was_training)
    metrics = {"eval_loss": total_loss / max(count, 1)}
    if classified and count:
        metrics["eval_accuracy"] = correct / count
    return metrics


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class _ProgressLine:
    """One line on stderr, redrawn in place: step, loss, throughput. Silent when stderr is not a
    terminal (CI logs, torchrun's other ranks) unless asked for."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled

    def update(self, step: int, loss: float, samples_per_s: float) -> None:
        if not self.enabled:
            return
        width = 20
        filled = width * step // max(self.total, 1)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total}  loss {loss:.4f}  "
            f"{samples_per_s:,.0f} samples/s"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"fit: {message}")


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_data: Dataset,
    *,
    batch_size: int,
    max_steps: Optional[int] = None,
    epochs: Optional[int] = None,
    loss_fn: Optional[Callable[[Any, Any], Tensor]] = None,
    compute_loss: Optional[ComputeLoss] = None,
    scheduler: Optional[Any] = None,
    precision: str = "fp32",
    accumulation_steps: int = 1,
    max_grad_norm: Optional[float] = None,
    eval_data: Optional[Dataset] = None,
    eval_every: Optional[int] = None,
    eval_batch_size: Optional[int] = None,
    checkpoint_dir: Optional[str | Path] = None,
    checkpoint_every: Optional[int] = None,
    resume: bool | str | Path = False,
    log_path: Optional[str | Path] = None,
    log_every: int = 10,
    progress: Optional[bool] = None,
    compile: bool | dict[str, Any] = False,
    seed: int = 0,
    shuffle: bool = True,
    num_workers: int = 0,
    collate_fn: Optional[Callable] = None,
) -> FitResult:
    """Train `model` on `train_data` for `max_steps` optimizer steps (or `epochs` epochs).

    Args:
        model, optimizer: the model (on its device: CPU or CUDA) and an optimizer over its parameters.
        train_data: a map-style Dataset; batches are drawn in an order fixed by (seed, epoch).
        batch_size: per process and micro-batch. One optimizer step sees
            batch_size × accumulation_steps × world size samples.
        loss_fn(outputs, targets): for batches of (inputs, targets); or compute_loss(model, batch)
            for anything else (see distillation_step).
        scheduler: an LR scheduler, stepped once per optimizer step.
        precision: "fp32", "bf16" (autocast) or "fp16" (autocast + GradScaler).
        max_grad_norm: clip the gradients' global L2 norm (after unscaling).
        eval_data, eval_every: evaluate (see :func:`evaluate`) every `eval_every` steps and at the end.
        checkpoint_dir, checkpoint_every: save every `checkpoint_every` steps and at the end.
        resume: True resumes from checkpoint_dir/latest.pt when it exists; or a checkpoint path.
        log_path: a JSONL file; one line per `log_every` steps (step, epoch, loss, lr, grad_norm,
            samples_per_s, elapsed_s) and one per evaluation. Appended to on resume.
        progress: a progress line on stderr; default: when stderr is a terminal (main process).
        compile: run the forward through torch.compile (opt-in); a dict is passed to torch.compile as
            keyword arguments (e.g. {"mode": "max-autotune"}). The checkpoint holds the plain model.
    Under ``torchrun --nproc_per_node=N`` the model is wrapped in DistributedDataParallel (gloo on
    CPU, nccl on CUDA), each process reads its shard of every global batch, and only process 0
    writes logs and checkpoints.
    """
    _check(precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    _check(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
    _check(accumulation_steps >= 1, f"accumulation_steps must be >= 1, got {accumulation_steps}")
    _check((loss_fn is None) != (compute_loss is None), "give exactly one of loss_fn and compute_loss")
    _check((max_steps is None) != (epochs is None), "give exactly one of max_steps and epochs")
    _check(eval_every is None or eval_data is not None, "eval_every needs eval_data")
    _check(checkpoint_every is None or checkpoint_dir is not None, "checkpoint_every needs checkpoint_dir")
    _check(max_grad_norm is None or max_grad_norm > 0, f"max_grad_norm must be > 0, got {max_grad_norm}")

    device = next(model.parameters()).device
    info = distributed.setup(device)
    device = distributed.device_for(device, info)
    model.to(device)
    per_epoch = data.batches_per_epoch(len(train_data), batch_size, info.world_size)
    _check(per_epoch >= 1, f"train_data ({len(train_data)} samples) has no full batch of {batch_size} per process")
    if epochs is not None:
        max_steps = epochs * per_epoch // accumulation_steps
    compute = compute_loss or _default_compute_loss(loss_fn)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    step, epoch, batch_in_epoch = 0, 0, 0
    resume_from = checkpoint.find(resume, checkpoint_dir)
    if resume_from is not None:
        state = checkpoint.load(resume_from, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        config = state["config"]
        now = {"seed": seed, "batch_size": batch_size, "accumulation_steps": accumulation_steps, "world_size": info.world_size}
        if config != now:
            warnings.warn(f"fit: resuming with {now}, the checkpoint was written with {config}: the run will not "
                          "repeat the data order of the uninterrupted one", RuntimeWarning, stacklevel=2)
        rng = state["rng"]
        checkpoint.set_rng_state(rng[info.rank] if info.rank < len(rng) else rng[0])

    train_module = distributed.wrap(model, device, info)
    if compile:
        forward_module = torch.compile(train_module, **(compile if isinstance(compile, dict) else {}))
    else:
        forward_module = train_module
    log_file = None
    if log_path is not None and info.is_main:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "a")
    bar = _ProgressLine(max_steps, info.is_main and (sys.stderr.isatty() if progress is None else progress))
    result = FitResult(step=step, epoch=epoch, loss=None)
    samples_per_step = batch_size * accumulation_steps * info.world_size

    def log(record: dict[str, Any]) -> None:
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def save() -> None:
        rngs = distributed.gather_objects(checkpoint.rng_state(), info)  # every process's own RNG
        if info.is_main:
            result.checkpoint = checkpoint.save(checkpoint_dir, step, {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict(),
                "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "rng": rngs,
                "config": {"seed": seed, "batch_size": batch_size, "accumulation_steps": accumulation_steps,
                           "world_size": info.world_size},
            })
        distributed.barrier(info)

    def run_eval() -> None:
        metrics = evaluate(model, eval_data, batch_size=eval_batch_size or batch_size, loss_fn=loss_fn,
                           compute_loss=compute_loss, precision=precision, device=device, collate_fn=collate_fn)
        result.evals.append({"step": step, **metrics})
        log({"step": step, "epoch": epoch, **metrics})

    model.train()
    optimizer.zero_grad(set_to_none=True)
    window_loss, window_steps, grad_norm = torch.zeros((), device=device), 0, None
    window_start = time.perf_counter()
    run_start = window_start
    micro = 0  # micro-batches into the current accumulation window
    try:
        while step < max_steps:
            loader = data.epoch_loader(
                train_data, batch_size, epoch, seed=seed, shuffle=shuffle, rank=info.rank,
                world_size=info.world_size, skip_batches=batch_in_epoch, num_workers=num_workers, collate_fn=collate_fn,
            )
            for batch in loader:
                batch_in_epoch += 1
                micro += 1
                last_micro = micro == accumulation_steps
                sync = contextlib.nullcontext() if last_micro or not info.distributed else train_module.no_sync()
                with sync:
                    with _autocast(device, precision):
                        loss = compute(forward_module, data.to_device(batch, device))
                    scaler.scale(loss / accumulation_steps).backward()
                window_loss += loss.detach().float() / accumulation_steps  # no host sync per step
                if not last_micro:
                    continue
                micro = 0
                if max_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm).item()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None:
                    scheduler.step()
                step += 1
                window_steps += 1
                if step % log_every == 0 or step == max_steps:
                    elapsed = time.perf_counter() - window_start
                    mean_loss = distributed.mean_over_processes(float(window_loss) / window_steps, info, device)
                    throughput = samples_per_step * window_steps / max(elapsed, 1e-9)
                    record = {"step": step, "epoch": epoch, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
                              "samples_per_s": throughput, "elapsed_s": time.perf_counter() - run_start}
                    if grad_norm is not None:
                        record["grad_norm"] = grad_norm if math.isfinite(grad_norm) else str(grad_norm)
                    if scaler.is_enabled():
                        record["loss_scale"] = scaler.get_scale()
                    log(record)
                    bar.update(step, mean_loss, throughput)
                    result.loss = mean_loss
                    window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()
                if eval_every is not None and step % eval_every == 0:
                    run_eval()
                if checkpoint_every is not None and step % checkpoint_every == 0:
                    save()
                if step >= max_steps:
                    break
            else:  # the epoch ran out
                epoch += 1
                batch_in_epoch = 0
        if eval_data is not None and (not result.evals or result.evals[-1]["step"] != step):
            run_eval()
        if checkpoint_dir is not None and (result.checkpoint is None or checkpoint_every is None or step % checkpoint_every):
            save()
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    result.step, result.epoch = step, epoch
    return result
