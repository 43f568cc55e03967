"""Benchmark definition of flash attention: bigkernels.nn.functional.scaled_dot_product_attention
against torch.nn.functional.scaled_dot_product_attention (eager: on CPU torch picks its own flash
kernel, on a GPU its best backend) and torch.compile of it.

Shapes: B (batch), H (heads), L (= S, sequence length), D (head dim), causal (0/1); self-attention
layout (B, H, L, D).
CPU grid (the issue's): float32, B·L = 4096 or 16384 tokens, H·D = 512..2048, causal and not.
GPU grid (FlashAttention's benchmark convention): bf16, B·L = 16384 tokens, H·D = 2048, D = 64 and
128, L = 1k..16k, causal and not.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

from bigkernels import reference
from bigkernels.bench.cases import Case, Inputs, OpBench, Outputs, Provider, Step, float64_copy, make_step
from bigkernels.bench.providers import TORCH, TORCH_COMPILE, bigkernels_backends, bigkernels_provider_name, forced
from bigkernels.nn.functional import scaled_dot_product_attention

OP = "attention"

# Quick CPU suite: one shape (4k tokens, 8 heads x 64), causal and not, so that this op's quick
# suite stays within ~35 s on a 2-core CPU (3 providers, a float64 reference, fwd and fwd+bwd).
QUICK_CPU = [dict(B=8, H=8, L=512, D=64)]
# Full CPU grid: 4k tokens at every length, 16k tokens at the long ones (shorter ones add little).
FULL_CPU = [
    dict(B=tokens // length, H=heads, L=length, D=dim)
    for tokens, lengths in ((4096, (512, 1024, 2048, 4096)), (16384, (2048, 4096)))
    for length in lengths
    for (heads, dim) in ((8, 64), (16, 64), (16, 128), (32, 64))
]
GPU_TOKENS, GPU_HIDDEN = 16384, 2048
QUICK_GPU_LENGTHS = (1024, 4096, 16384)
FULL_GPU_LENGTHS = (1024, 2048, 4096, 8192, 16384)
# Heads whose float64 reference is computed at once: bounds its L x S matrices (8 bytes each).
REFERENCE_BYTES = 2**31


def shapes(device: str, full: bool) -> list[dict[str, int]]:
    if device == "cpu":
        base = FULL_CPU if full else QUICK_CPU
    else:
        lengths = FULL_GPU_LENGTHS if full else QUICK_GPU_LENGTHS
        base = [dict(B=GPU_TOKENS // l, H=GPU_HIDDEN // d, L=l, D=d) for d in (64, 128) for l in lengths]
    return [dict(s, causal=c) for s in base for c in (0, 1)]


def dtypes(device: str, full: bool) -> tuple[torch.dtype, ...]:
    if device == "cpu":
        return (torch.float32, torch.bfloat16) if full else (torch.float32,)
    return (torch.bfloat16, torch.float16) if full else (torch.bfloat16,)


# ------------------------------------------------------------------------------ cost formulas
def flops(case: Case) -> int:
    """4·B·H·L·S·D for the forward (Q K^T and P V, 2 flops per multiply-add), halved for causal;
    the backward is 2.5× the forward (5 GEMMs of that size against 2), so fwd+bwd is 3.5×."""
    s = case.shape
    forward = 4 * s["B"] * s["H"] * s["L"] * s["L"] * s["D"]
    if s["causal"]:
        forward //= 2
    return int(forward * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[case.mode])


def bytes_moved(case: Case) -> int:
    """Minimum traffic in the input dtype: forward reads Q, K, V and writes O (4 B·H·L·D);
    backward reads Q, K, V, O, dO and writes dQ, dK, dV (8 B·H·L·D); the float32 lse is left out."""
    s = case.shape
    elem = torch.finfo(case.dtype).bits // 8
    per = s["B"] * s["H"] * s["L"] * s["D"]
    return elem * per * {"fwd": 4, "bwd": 8, "fwd+bwd": 12}[case.mode]


# ------------------------------------------------------------------------------ inputs and reference
def make_inputs(case: Case) -> Inputs:
    """q, k, v, grad_out ~ N(0, 1), drawn in float32 on the CPU (seeded by the case) and cast."""
    s = case.shape
    gen = torch.Generator().manual_seed(case.seed)
    names = ("q", "k", "v") + (("grad_out",) if case.mode != "fwd" else ())
    inputs = {
        n: torch.randn(s["B"], s["H"], s["L"], s["D"], generator=gen).to(device=case.device, dtype=case.dtype)
        for n in names
    }
    if case.mode != "fwd":
        for n in ("q", "k", "v"):
            inputs[n].requires_grad_(True)
    return inputs


def reference_outputs(case: Case, inputs: Inputs) -> Outputs:
    """bigkernels.reference.attention in float64, a few heads at a time (its L x S matrices would
    not fit otherwise), in provider output order: (out,) for fwd; (out, dq, dk, dv) for fwd+bwd;
    (dq, dk, dv) for bwd."""
    ref = float64_copy(inputs, case.device)
    s = case.shape
    window = (-1, 0) if s["causal"] else (-1, -1)
    per_head = s["L"] * s["L"] * 8 * 4  # scores, probabilities and their gradients
    chunk = max(1, REFERENCE_BYTES // per_head)
    per_batch: list[list[Outputs]] = []  # [b][head chunk] -> outputs
    for b in range(s["B"]):
        per_batch.append([])
        for h0 in range(0, s["H"], chunk):
            sl = (slice(b, b + 1), slice(h0, h0 + chunk))
            q, k, v = (ref[n][sl].detach().requires_grad_(case.mode != "fwd") for n in ("q", "k", "v"))

            def forward(q=q, k=k, v=v) -> Outputs:
                return (reference.attention(q, k, v, window=window)[0],)

            grads = [ref["grad_out"][sl]] if case.mode != "fwd" else []
            per_batch[-1].append(tuple(make_step(case.mode, forward, [q, k, v], grads).next_call()()))
    count = len(per_batch[0][0])
    return tuple(
        torch.cat([torch.cat([chunk_out[i] for chunk_out in chunks], dim=1) for chunks in per_batch], dim=0)
        for i in range(count)
    )


# ------------------------------------------------------------------------------ providers
def _step(case: Case, inputs: Inputs, attend) -> Step:
    def forward() -> Outputs:
        return (attend(inputs["q"], inputs["k"], inputs["v"]),)

    leaves = [inputs[n] for n in ("q", "k", "v")]
    grads = [inputs["grad_out"]] if case.mode != "fwd" else []
    return make_step(case.mode, forward, leaves, grads)


def _bigkernels(backend: Optional[str]) -> Provider:
    def build(case: Case, inputs: Inputs) -> Step:
        causal = bool(case.shape["causal"])

        def attend(q, k, v):
            with forced(backend):  # None: the automatic choice
                return scaled_dot_product_attention(q, k, v, is_causal=causal)

        return _step(case, inputs, attend)

    return Provider(bigkernels_provider_name(backend), build)


def _torch_eager(case: Case, inputs: Inputs) -> Step:
    causal = bool(case.shape["causal"])
    return _step(case, inputs, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal))


def _torch_compile(case: Case, inputs: Inputs) -> Step:
    causal = bool(case.shape["causal"])
    torch._dynamo.reset()  # one compiled function per case; avoids hitting the recompile limit
    compiled = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                             fullgraph=True, dynamic=False)
    return _step(case, inputs, compiled)


# ------------------------------------------------------------------------- optional peers
# Peers take (B, L, H, D) tensors: the (B, H, L, D) inputs are passed as transposed views (no copy),
# which is what a model holding (B, L, H, D) activations would hand them.
def _flash_attn(case: Case, inputs: Inputs) -> Step:
    from flash_attn import flash_attn_func  # noqa: PLC0415  (optional peer)

    causal = bool(case.shape["causal"])
    return _step(case, inputs, lambda q, k, v: flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2))


def _xformers(case: Case, inputs: Inputs) -> Step:
    from xformers.ops import LowerTriangularMask, memory_efficient_attention  # noqa: PLC0415

    bias = LowerTriangularMask() if case.shape["causal"] else None
    return _step(case, inputs, lambda q, k, v: memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias).transpose(1, 2))


PEERS = {"flash-attn": ("flash_attn", _flash_attn), "xformers": ("xformers", _xformers)}


def _peer_providers(case: Case) -> tuple[list[Provider], dict[str, str]]:
    """The installed peers that can run the case; each other one with the reason it is left out."""
    found, skipped = [], {}
    for name, (module, build) in PEERS.items():
        if importlib.util.find_spec(module) is None:
            skipped[name] = f"{module} is not installed"
        elif case.device != "cuda":
            skipped[name] = "runs on CUDA tensors only"
        elif name == "flash-attn" and case.dtype not in (torch.float16, torch.bfloat16):
            skipped[name] = "takes float16/bfloat16 only"
        else:
            found.append(Provider(name, build))
    return found, skipped


def providers(case: Case, full: bool) -> tuple[list[Provider], dict[str, str]]:
    backends, skipped = bigkernels_backends(OP, case.device, full)
    if "reference" in backends:  # its L x S float matrices at these lengths: gigabytes per head
        backends.remove("reference")
        skipped[bigkernels_provider_name("reference")] = "materialises the L x S scores; not timed at these sizes"
    peers, peers_skipped = _peer_providers(case)
    skipped.update(peers_skipped)
    stock = [Provider(TORCH, _torch_eager), Provider(TORCH_COMPILE, _torch_compile)]
    return [_bigkernels(None)] + [_bigkernels(b) for b in backends] + stock + peers, skipped


BENCH = OpBench(
    name=OP,
    shapes=shapes,
    dtypes=dtypes,
    make_inputs=make_inputs,
    flops=flops,
    bytes=bytes_moved,
    reference=reference_outputs,
    providers=providers,
    plot_x="L",
)
