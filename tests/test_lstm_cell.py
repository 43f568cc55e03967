"""bigkernels::lstm_cell on every backend: numerics against float64 and the stock cell, gradients,
gradcheck, opcheck, torch.compile, autocast, backend selection and bad input."""
from __future__ import annotations

import pytest
import torch

import bigkernels
from bigkernels import reference
from bigkernels.nn.functional import lstm_cell
from conftest import HAS_CUDA
from numerics import assert_matches

GPU = "cuda"
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # on CPU: the Triton interpreter

# (backend, device, dtypes it is checked in). bf16 Triton dots are wrong under the interpreter.
BACKENDS = [
    pytest.param("cpu", "cpu", (torch.float32, torch.float64, torch.bfloat16), id="cpu"),
    pytest.param("reference", "cpu", (torch.float32, torch.float64), id="reference"),
    pytest.param(
        "triton",
        TRITON_DEVICE,
        (torch.float32, torch.float16, torch.bfloat16) if HAS_CUDA else (torch.float32, torch.float16),
        id="triton",
        marks=pytest.mark.triton,
    ),
    pytest.param("cuda", GPU, (torch.float32, torch.float16, torch.bfloat16, torch.float64), id="cuda", marks=pytest.mark.cuda),
]

# (batch, input_size, hidden_size): odd sizes, 1s, a batch of 0, sizes straddling block edges.
SHAPES = [(1, 1, 1), (7, 13, 5), (3, 20, 16), (63, 33, 129), (0, 4, 8), (2, 1, 65)]


def make_case(batch, input_size, hidden, *, bias=True, seed=0):
    """Fresh random float64 tensors for one step (never zeros: a kernel that ignores a term fails)."""
    g = torch.Generator().manual_seed(seed)
    scale = hidden ** -0.5

    def rnd(*shape, s=1.0):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * s

    case = dict(
        input=rnd(batch, input_size),
        hx=rnd(batch, hidden),
        cx=rnd(batch, hidden, s=2.0),
        w_ih=rnd(4 * hidden, input_size, s=scale * 2),
        w_hh=rnd(4 * hidden, hidden, s=scale * 2),
    )
    case["b_ih"] = rnd(4 * hidden, s=scale) if bias else None
    case["b_hh"] = rnd(4 * hidden, s=scale) if bias else None
    return case


def cast(case, dtype, device, requires_grad=False):
    out = {}
    for k, v in case.items():
        if v is None:
            out[k] = None
        else:
            out[k] = v.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return out


def run(fn, case):
    return fn(case["input"], (case["hx"], case["cx"]), case["w_ih"], case["w_hh"], case["b_ih"], case["b_hh"])


def forward_and_grads(fn, case, grad_h, grad_c):
    """Outputs and the gradients of every tensor argument for the upstream grads (grad_h, grad_c)."""
    h, c = run(fn, case)
    names = [k for k, v in case.items() if v is not None]
    grads = torch.autograd.grad((h, c), [case[k] for k in names], (grad_h, grad_c), allow_unused=True)
    return (h, c), dict(zip(names, grads))


def reference_lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return reference.lstm_cell(input, hx[0], hx[1], w_ih, w_hh, b_ih, b_hh)


def stock_lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return torch.lstm_cell(input, list(hx), w_ih, w_hh, b_ih, b_hh)


@pytest.mark.parametrize("backend, device, dtypes", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference_and_stock(backend, device, dtypes, shape, bias, poison_empty):
    for seed, dtype in enumerate(dtypes):
        case64 = make_case(*shape, bias=bias, seed=seed)
        g = torch.Generator().manual_seed(100 + seed)
        grad_h = torch.randn(shape[0], shape[2], generator=g, dtype=torch.float64)
        grad_c = torch.randn(shape[0], shape[2], generator=g, dtype=torch.float64)

        ref_out, ref_grads = forward_and_grads(reference_lstm_cell, cast(case64, torch.float64, "cpu", True), grad_h, grad_c)
        stock_out, stock_grads = forward_and_grads(
            stock_lstm_cell, cast(case64, dtype, device, True), grad_h.to(device, dtype), grad_c.to(device, dtype)
        )
        with bigkernels.use_backend(backend):
            ours_out, ours_grads = forward_and_grads(
                lstm_cell, cast(case64, dtype, device, True), grad_h.to(device, dtype), grad_c.to(device, dtype)
            )
        for name, ours, stock, ref in zip(("h", "c"), ours_out, stock_out, ref_out):
            assert ours.device.type == device
            assert_matches(f"{backend}/{dtype}/{name}", ours, stock, ref)
        for name in ref_grads:
            assert_matches(f"{backend}/{dtype}/grad_{name}", ours_grads[name], stock_grads[name], ref_grads[name])


@pytest.mark.parametrize("backend, device, dtypes", BACKENDS)
def test_strided_and_broadcast_inputs(backend, device, dtypes):
    """Transposed input, expanded (stride-0) states and sliced weights give the contiguous result."""
    dtype = dtypes[0]
    case = cast(make_case(5, 9, 12, seed=3), dtype, device)
    strided = dict(case)
    strided["input"] = case["input"].t().contiguous().t()
    strided["hx"] = case["hx"][:1].expand(5, 12)
    strided["cx"] = torch.cat([case["cx"], case["cx"]], dim=1)[:, ::2]
    strided["w_hh"] = case["w_hh"].t().contiguous().t()
    dense = dict(case, hx=strided["hx"].contiguous(), cx=strided["cx"].contiguous())
    with bigkernels.use_backend(backend):
        h1, c1 = run(lstm_cell, strided)
        h2, c2 = run(lstm_cell, dense)
    torch.testing.assert_close(h1, h2)
    torch.testing.assert_close(c1, c2)


@pytest.mark.parametrize("backend, device, dtypes", BACKENDS)
def test_unbatched_and_default_state(backend, device, dtypes):
    dtype = dtypes[0]
    case = cast(make_case(1, 6, 10, seed=4), dtype, device)
    with bigkernels.use_backend(backend):
        h, c = lstm_cell(case["input"][0], (case["hx"][0], case["cx"][0]), case["w_ih"], case["w_hh"], case["b_ih"], case["b_hh"])
        hb, cb = run(lstm_cell, case)
        h0, c0 = lstm_cell(case["input"], None, case["w_ih"], case["w_hh"], case["b_ih"], case["b_hh"])
    assert h.shape == c.shape == (10,)
    torch.testing.assert_close(h, hb[0])
    torch.testing.assert_close(c, cb[0])
    zeros = torch.zeros_like(case["hx"])
    hz, cz = stock_lstm_cell(case["input"], (zeros, zeros), case["w_ih"], case["w_hh"], case["b_ih"], case["b_hh"])
    torch.testing.assert_close(h0, hz, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(c0, cz, atol=1e-5, rtol=1e-4)


def test_gradcheck_cpu_float64():
    for bias in (True, False):
        case = cast(make_case(3, 5, 4, bias=bias, seed=5), torch.float64, "cpu", True)
        args = [case[k] for k in ("input", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh")]

        def fn(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
            with bigkernels.use_backend("cpu"):
                return lstm_cell(input, (hx, cx), w_ih, w_hh, b_ih, b_hh)

        assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_partial_requires_grad():
    """Only some arguments need grads: the backward skips the other GEMMs and stays correct."""
    case = cast(make_case(4, 3, 5, seed=6), torch.float64, "cpu")
    for needed in (("input",), ("hx", "cx"), ("w_ih", "w_hh"), ("b_ih",), ("cx", "b_hh")):
        args = {k: (v.clone().requires_grad_(k in needed) if v is not None else None) for k, v in case.items()}

        def fn(*tensors):
            a = dict(zip(needed, tensors))
            full = {k: a.get(k, v) for k, v in args.items()}
            with bigkernels.use_backend("cpu"):
                return run(lstm_cell, full)

        assert torch.autograd.gradcheck(fn, [args[k] for k in needed])


def _op_samples(device, dtype):
    samples = []
    for shape, bias in (((3, 5, 4), True), ((1, 1, 1), False), ((0, 2, 3), True)):
        case = cast(make_case(*shape, bias=bias, seed=7), dtype, device, True)
        for need in (True, False):
            samples.append((case["input"], case["hx"], case["cx"], case["w_ih"], case["w_hh"], case["b_ih"], case["b_hh"], need))
    return samples


def _backward_samples(device, dtype):
    case = cast(make_case(3, 5, 4, seed=8), dtype, device)
    _, cy, ws = torch.ops.bigkernels.lstm_cell(case["input"], case["hx"], case["cx"], case["w_ih"], case["w_hh"], case["b_ih"], case["b_hh"], True)
    g = torch.randn_like(cy)
    base = (g, torch.randn_like(cy), case["input"], case["hx"], case["cx"], case["w_ih"], case["w_hh"], cy, ws)
    return [base + (mask,) for mask in ([True, True, True, True], [False, True, False, True], [False, False, False, False])]


@pytest.mark.parametrize("need_workspace_sample", range(6))
def test_opcheck_cpu(need_workspace_sample):
    args = _op_samples("cpu", torch.float64)[need_workspace_sample]
    torch.library.opcheck(torch.ops.bigkernels.lstm_cell.default, args)


def test_opcheck_cpu_backward():
    for args in _backward_samples("cpu", torch.float64):
        torch.library.opcheck(torch.ops.bigkernels.lstm_cell_backward.default, args)


@pytest.mark.triton
def test_opcheck_triton():
    dtype = torch.float32
    for args in _op_samples(TRITON_DEVICE, dtype)[:4]:
        torch.library.opcheck(torch.ops.bigkernels.lstm_cell_triton.default, args, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        for args in _backward_samples(TRITON_DEVICE, dtype):
            torch.library.opcheck(torch.ops.bigkernels.lstm_cell_backward_triton.default, args, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_opcheck_cuda():
    for args in _op_samples(GPU, torch.float32)[:4]:
        torch.library.opcheck(torch.ops.bigkernels.lstm_cell.default, args, atol=1e-4, rtol=1e-4)
    for args in _backward_samples(GPU, torch.float32):
        torch.library.opcheck(torch.ops.bigkernels.lstm_cell_backward.default, args, atol=1e-4, rtol=1e-4)


def test_workspace_only_when_training():
    case = cast(make_case(3, 5, 4, seed=9), torch.float32, "cpu")
    args = (case["input"], case["hx"], case["cx"], case["w_ih"], case["w_hh"], case["b_ih"], case["b_hh"])
    assert torch.ops.bigkernels.lstm_cell(*args, False)[2].shape == (0,)
    assert torch.ops.bigkernels.lstm_cell(*args, True)[2].shape == (3, 16)
    # Differentiated without the workspace (a direct op call), the backward recomputes the gates.
    args_grad = tuple(a.detach().requires_grad_() for a in args)
    h, c, _ = torch.ops.bigkernels.lstm_cell(*args_grad, False)
    grads = torch.autograd.grad((h * c).sum(), args_grad)
    h, c, _ = torch.ops.bigkernels.lstm_cell(*args_grad, True)
    for a, b in zip(grads, torch.autograd.grad((h * c).sum(), args_grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    device = "cpu" if backend == "cpu" else TRITON_DEVICE
    case = cast(make_case(4, 6, 8, seed=10), torch.float32, device, True)

    def step(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
        h, c = lstm_cell(input, (hx, cx), w_ih, w_hh, b_ih, b_hh)
        h, c = lstm_cell(input, (h, c), w_ih, w_hh, b_ih, b_hh)
        return (h * c).sum()

    args = [case[k] for k in ("input", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh")]
    with bigkernels.use_backend(backend):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" and backend == "triton" else "inductor")
        loss_c = compiled(*args)
        grads_c = torch.autograd.grad(loss_c, args)
        loss_e = step(*args)
        grads_e = torch.autograd.grad(loss_e, args)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_autocast_cpu_returns_the_stock_dtype():
    """Under CPU autocast the stock cell returns float32 (only its GEMMs drop to bfloat16, through
    autocast's linear). Ours returns float32 too, computed in float32: same dtype, at least as accurate."""
    case64 = make_case(3, 5, 4, seed=11)
    case = cast(case64, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, c = run(lstm_cell, case)
        hs, cs = run(stock_lstm_cell, case)
    assert h.dtype == hs.dtype == c.dtype == cs.dtype == torch.float32
    href, cref = run(reference_lstm_cell, case64)
    assert_matches("h", h, hs, href)
    assert_matches("c", c, cs, cref)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_autocast_cuda_runs_in_autocast_dtype_like_stock(dtype, backend):
    case = cast(make_case(8, 16, 32, seed=12), torch.float32, GPU, True)
    with torch.autocast("cuda", dtype=dtype), bigkernels.use_backend(backend):
        h, c = run(lstm_cell, case)
        hs, cs = run(stock_lstm_cell, case)
    assert h.dtype == hs.dtype == dtype
    (h.float().sum() + c.float().sum()).backward()
    assert case["w_ih"].grad.dtype == torch.float32


# ----------------------------------------------------------------------------------- bad input
def _bad(**changes):
    case = cast(make_case(3, 5, 4, seed=13), torch.float32, "cpu")
    case.update(changes)
    return case


BAD_INPUTS = [
    ("wrong input size", dict(input=torch.randn(3, 6)), ValueError, "input_size: got 6, expected 5"),
    ("input rank", dict(input=torch.randn(2, 3, 5)), ValueError, "input must be 1-D"),
    ("batch mismatch", dict(hx=torch.randn(2, 4)), ValueError, r"hx must have shape \(batch, hidden_size\)"),
    ("cx batch mismatch", dict(cx=torch.randn(4, 4)), ValueError, r"cx must have shape"),
    ("dtype mismatch", dict(hx=torch.randn(3, 4, dtype=torch.float64)), TypeError, "hx must have the dtype of input"),
    ("device mismatch", dict(cx=torch.randn(3, 4, device="meta")), ValueError, "cx must be on the device of input"),
    ("integer input", dict(input=torch.ones(3, 5, dtype=torch.int64)), TypeError, "input must be a floating-point tensor"),
    ("one bias", dict(b_hh=None), ValueError, "b_ih and b_hh must both be given"),
    ("bias shape", dict(b_ih=torch.randn(15)), ValueError, r"b_ih must have shape \(4\*hidden_size,\)"),
    ("w_hh shape", dict(w_hh=torch.randn(16, 5)), ValueError, r"w_hh must have shape \(4\*hidden_size, hidden_size\)"),
    ("w_ih rows", dict(w_ih=torch.randn(12, 5)), ValueError, r"w_ih must have shape \(4\*hidden_size, input_size\)"),
    ("not a tensor", dict(input=[[1.0] * 5] * 3), TypeError, "input must be a torch.Tensor"),
]


@pytest.mark.parametrize("what, changes, error, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(what, changes, error, message):
    with pytest.raises(error, match=message):
        run(lstm_cell, _bad(**changes))


def test_bad_hx_pair():
    case = _bad()
    with pytest.raises(ValueError, match=r"hx must be a pair \(h, c\)"):
        lstm_cell(case["input"], (case["hx"],), case["w_ih"], case["w_hh"])


def test_op_level_checks_guard_direct_calls():
    """torch.ops.bigkernels.* called directly (bypassing Python validation) still refuses bad shapes."""
    case = _bad()
    with pytest.raises(RuntimeError, match="hx must be"):
        torch.ops.bigkernels.lstm_cell(case["input"], torch.randn(2, 4), case["cx"], case["w_ih"], case["w_hh"], None, None, False)
    with pytest.raises(RuntimeError, match="float32, float64 and bfloat16"):
        c16 = {k: v.half() for k, v in case.items()}
        torch.ops.bigkernels.lstm_cell(c16["input"], c16["hx"], c16["cx"], c16["w_ih"], c16["w_hh"], None, None, False)


def test_backend_unavailable_is_an_error_not_a_fallback():
    case = _bad()
    with bigkernels.use_backend("cuda"), pytest.raises(bigkernels.BackendUnavailable, match="cuda backend takes CUDA tensors"):
        run(lstm_cell, case)


@pytest.mark.triton
def test_triton_launchers_refuse_mixed_devices():
    """Triton launches on one device: tensors on two (here cpu and meta) are refused, naming both."""
    kernels = pytest.importorskip("bigkernels.triton.lstm_cell")
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    w_ih, w_hh = torch.randn(16, 3), torch.randn(16, 4)
    with pytest.raises(RuntimeError, match="lstm_cell_triton: .* input is on cpu and cx on meta"):
        kernels.lstm_cell_forward(x, h, torch.randn(2, 4, device="meta"), w_ih, w_hh, None, None, False)


def test_has_cuda_kernel_asks_the_dispatcher():
    """The forced "cuda" backend is refused for ops without a CUDA C++ kernel (attention, conv, lstm_ext),
    from what is registered for the CUDA dispatch key, not from a list kept by hand."""
    from bigkernels import _backend, _extension

    with_cuda = _extension.AVAILABLE and _extension.WITH_CUDA
    for op in ("lstm_cell", "lstm", "conv_depthwise"):
        assert _backend.has_cuda_kernel(op) == with_cuda, op
    for op in ("attention", "conv", "lstm_ext", "lstm_cell_triton", "no_such_op"):
        assert not _backend.has_cuda_kernel(op), op
    lib = torch.library.Library("bigkernels_probe", "DEF")  # an op that does have a CUDA kernel
    lib.define("probe(Tensor x) -> Tensor")
    lib.impl("probe", lambda x: x, "CUDA")
    assert _backend.has_cuda_kernel("probe", namespace="bigkernels_probe")
    assert not _backend.has_cuda_kernel("probe", namespace="bigkernels_probe_none")


def test_forced_cuda_backend_names_ops_without_a_cuda_kernel(monkeypatch):
    from bigkernels import _backend, _extension

    if not _extension.AVAILABLE:
        pytest.skip(_extension.UNAVAILABLE_REASON)
    monkeypatch.setattr(_extension, "WITH_CUDA", True)  # as a CUDA build would say
    cuda = torch.device("cuda")
    for op in ("attention", "conv", "lstm_ext"):
        assert _backend.unavailable_reason("cuda", op, cuda) == (
            f"op {op} has no CUDA C++ kernel (use the triton backend, or none to choose automatically)")
    monkeypatch.setattr(_backend, "has_cuda_kernel", lambda op: op == "lstm_cell")
    assert _backend.unavailable_reason("cuda", "lstm_cell", cuda) is None
