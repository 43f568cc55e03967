"""fit() under torchrun: 2 CPU processes (gloo) with DistributedDataParallel and a DistributedSampler
end with the parameters of a single process trained on the same global batches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ddp_fit_worker

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ddp_fit_worker.py")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    # Per process: batch 4, accumulation 2 -> global batch 2 x 4 x 2 = 16 per optimizer step.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               "--out", str(out), "--batch-size", "4", "--accumulation", "2", "--steps", "6",
               "--checkpoint-dir", str(tmp_path / "ckpt"), "--metrics-log", str(tmp_path / "log.jsonl")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ddp = torch.load(out)

    single = ddp_fit_worker.run(batch_size=8, steps=6, accumulation=2)
    for name, param in single.named_parameters():
        # Equal up to float rounding: DDP averages the two processes' mean gradients, one process
        # takes the mean over the whole batch.
        torch.testing.assert_close(ddp[name], param.detach(), rtol=1e-5, atol=1e-6, msg=name)

    state = torch.load(tmp_path / "ckpt" / "latest.pt", weights_only=False)
    assert state["step"] == 6 and len(state["rng"]) == 2 and state["config"]["world_size"] == 2
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # one log, written by process 0 only
