"""bigkernels::lstm (one layer, one direction, whole sequence) on every backend: numerics and gradients
against float64 and stock torch.lstm, padded and packed, reverse, projection, odd sizes, strided input,
gradcheck, opcheck, torch.compile and bad input."""
from __future__ import annotations

import pytest
import torch

import bigkernels
from bigkernels import reference
from bigkernels.nn.functional import lstm_layer
from conftest import HAS_CUDA
from lstm_cases import cast, make_case, shape_id, stock_lstm_layer, upstream_grads
from numerics import assert_matches

GPU = "cuda"
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # on CPU: the Triton interpreter
ARGS = ("input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")

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

# (seq_len, batch, input_size, hidden_size, proj_size, packed lengths or None). Odd sizes, 1s, batch 0,
# sizes straddling block edges, ragged packed batches.
SHAPES = [
    (1, 1, 1, 1, 0, None),
    (7, 3, 5, 4, 0, None),
    (5, 4, 3, 9, 4, None),
    (4, 1, 6, 65, 0, None),
    (3, 0, 2, 3, 0, None),
    (6, 4, 5, 7, 0, (6, 5, 2, 1)),
    (5, 3, 4, 6, 2, (5, 5, 3)),
    (1, 2, 3, 2, 1, (1, 1)),
]
# The interpreter is slow: Triton on CPU gets sizes around seq 3, batch 2, hidden 8.
TINY_SHAPES = [(3, 2, 3, 8, 0, None), (3, 2, 3, 8, 4, (3, 2)), (1, 1, 1, 1, 0, None)]


def call(fn, case, batch_sizes, reverse):
    return fn(case["input"], batch_sizes, case["h0"], case["c0"], case["w_ih"], case["w_hh"], case["b_ih"],
              case["b_hh"], case["w_hr"], reverse)


def forward_and_grads(fn, case, batch_sizes, reverse, upstream):
    """Outputs and the gradient of every tensor argument for the upstream gradients."""
    outs = call(fn, case, batch_sizes, reverse)
    names = [k for k in ARGS if case[k] is not None]
    grads = torch.autograd.grad(outs, [case[k] for k in names], upstream)
    return outs, dict(zip(names, grads))


def backend_cases():
    for param in BACKENDS:
        backend, device, dtypes = param.values
        shapes = TINY_SHAPES if backend == "triton" and not HAS_CUDA else SHAPES
        for shape in shapes:
            yield pytest.param(backend, device, dtypes, shape, id=f"{param.id}-{shape_id(shape)}", marks=param.marks)


def test_reference_is_stock_in_float64():
    """The float64 reference every other check leans on agrees with stock torch.lstm to rounding."""
    for shape in SHAPES:
        for reverse in (False, True):
            case, batch_sizes = make_case(*shape, seed=1)
            ref = call(reference.lstm_layer, case, batch_sizes, reverse)
            stock = call(stock_lstm_layer, case, batch_sizes, reverse)
            for r, s in zip(ref, stock):
                torch.testing.assert_close(r, s, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend, device, dtypes, shape", backend_cases())
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference_and_stock(backend, device, dtypes, shape, reverse, bias, poison_empty):
    for seed, dtype in enumerate(dtypes):
        case64, batch_sizes = make_case(*shape, bias=bias, seed=seed)
        ref_out = call(reference.lstm_layer, cast(case64, torch.float64, "cpu"), batch_sizes, reverse)
        upstream = upstream_grads(ref_out, dtype, device, seed=100 + seed)
        ref_out, ref_grads = forward_and_grads(
            reference.lstm_layer, cast(case64, torch.float64, "cpu", True), batch_sizes, reverse,
            [u.to("cpu", torch.float64) for u in upstream],
        )
        stock_out, stock_grads = forward_and_grads(
            stock_lstm_layer, cast(case64, dtype, device, True), batch_sizes, reverse, upstream
        )
        with bigkernels.use_backend(backend):
            ours_out, ours_grads = forward_and_grads(lstm_layer, cast(case64, dtype, device, True), batch_sizes, reverse, upstream)
        for name, ours, stock, ref in zip(("output", "h_n", "c_n"), ours_out, stock_out, ref_out):
            assert ours.device.type == device
            assert_matches(f"{backend}/{dtype}/{name}", ours, stock, ref)
        for name in ref_grads:
            assert_matches(f"{backend}/{dtype}/grad_{name}", ours_grads[name], stock_grads[name], ref_grads[name])


@pytest.mark.parametrize("backend, device, dtypes", BACKENDS)
def test_empty_sequence_passes_the_state_through(backend, device, dtypes):
    """seq_len 0 (stock torch.lstm refuses it): empty output, h_n = h0, c_n = c0, and the gradients
    flow straight through to the initial state."""
    dtype = dtypes[0]
    case = cast(make_case(0, 3, 4, 5, 2)[0], dtype, device, True)
    g_out, g_h, g_c = torch.randn(0, 3, 2), torch.randn(3, 2), torch.randn(3, 5)
    with bigkernels.use_backend(backend):
        out, h_n, c_n = call(lstm_layer, case, None, False)
        # The reference's empty output is a fresh tensor outside the graph: leave it out there.
        pairs = [(o, g.to(device, dtype)) for o, g in ((out, g_out), (h_n, g_h), (c_n, g_c)) if o.requires_grad]
        grads = torch.autograd.grad(
            [o for o, _ in pairs], [case[k] for k in ARGS], [g for _, g in pairs], allow_unused=True,
            materialize_grads=True,
        )
    assert out.shape == (0, 3, 2)
    torch.testing.assert_close(h_n, case["h0"])
    torch.testing.assert_close(c_n, case["c0"])
    got = dict(zip(ARGS, grads))
    torch.testing.assert_close(got["h0"], g_h.to(device, dtype))
    torch.testing.assert_close(got["c0"], g_c.to(device, dtype))
    for name in ("input", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"):
        assert not got[name].any(), name


@pytest.mark.parametrize("backend, device, dtypes", BACKENDS)
def test_strided_inputs_give_the_contiguous_result(backend, device, dtypes):
    """A batch_first view (what the module passes), expanded states and transposed weights."""
    dtype = dtypes[0]
    dense = cast(make_case(3, 2, 3, 8, 4, seed=3)[0], dtype, device)
    strided = dict(dense)
    strided["input"] = dense["input"].transpose(0, 1).contiguous().transpose(0, 1)
    strided["h0"] = dense["h0"][:1].expand(2, 4)
    strided["c0"] = torch.cat([dense["c0"], dense["c0"]], dim=1)[:, ::2]
    strided["w_hh"] = dense["w_hh"].t().contiguous().t()
    strided["w_hr"] = dense["w_hr"].t().contiguous().t()
    dense = dict(dense, h0=strided["h0"].contiguous(), c0=strided["c0"].contiguous())
    assert not strided["input"].is_contiguous() and not strided["c0"].is_contiguous()
    with bigkernels.use_backend(backend):
        for reverse in (False, True):
            got = call(lstm_layer, strided, None, reverse)
            want = call(lstm_layer, dense, None, reverse)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------- gradcheck
GRADCHECK_CASES = [
    pytest.param((3, 2, 3, 4, 0, None), True, False, id="padded"),
    pytest.param((3, 2, 3, 4, 0, None), True, True, id="padded-rev"),
    pytest.param((3, 2, 2, 4, 3, None), False, True, id="proj-nobias-rev"),
    pytest.param((3, 3, 2, 3, 0, (3, 2, 1)), True, False, id="packed"),
    pytest.param((3, 3, 2, 4, 2, (3, 3, 1)), True, True, id="packed-proj-rev"),
]


@pytest.mark.parametrize("shape, bias, reverse", GRADCHECK_CASES)
def test_gradcheck_cpu_float64(shape, bias, reverse):
    case, batch_sizes = make_case(*shape, bias=bias, seed=5)
    case = cast(case, torch.float64, "cpu", True)
    names = [k for k in ARGS if case[k] is not None]

    def fn(*tensors):
        with bigkernels.use_backend("cpu"):
            return call(lstm_layer, dict(case, **dict(zip(names, tensors))), batch_sizes, reverse)

    assert torch.autograd.gradcheck(fn, [case[k] for k in names])


def test_gradcheck_partial_requires_grad():
    """Only some arguments need gradients: the backward skips the rest and stays correct."""
    case, _ = make_case(3, 2, 3, 4, 2, seed=6)
    for needed in (("input",), ("h0", "c0"), ("w_ih", "w_hh"), ("b_hh",), ("w_hr", "c0")):
        args = cast(case, torch.float64, "cpu")

        def fn(*tensors):
            with bigkernels.use_backend("cpu"):
                return call(lstm_layer, dict(args, **dict(zip(needed, tensors))), None, False)

        assert torch.autograd.gradcheck(fn, [args[k].clone().requires_grad_() for k in needed])


def test_double_backward_is_refused_clearly():
    case = cast(make_case(2, 2, 3, 4, seed=7)[0], torch.float64, "cpu", True)
    out, _, _ = call(lstm_layer, case, None, False)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        (g,) = torch.autograd.grad(out.sum(), case["w_hh"], create_graph=True)
        g.sum().backward()


# ------------------------------------------------------------------------------------- opcheck
OP_CASES = [
    pytest.param((3, 2, 3, 4, 0, None), True, False, id="padded"),
    pytest.param((3, 2, 3, 5, 3, None), True, True, id="padded-proj-rev"),
    pytest.param((2, 1, 1, 1, 0, None), False, False, id="padded-nobias-tiny"),
    pytest.param((3, 0, 2, 3, 0, None), True, False, id="batch0"),
    pytest.param((3, 3, 2, 4, 0, (3, 2, 1)), True, True, id="packed-rev"),
]
FORWARD_OP_CASES = OP_CASES


def _op_args(shape, bias, reverse, need_workspace, device="cpu", dtype=torch.float64):
    case, batch_sizes = make_case(*shape, bias=bias, seed=8)
    case = cast(case, dtype, device, True)
    return (case["input"], batch_sizes, case["h0"], case["c0"], case["w_ih"], case["w_hh"], case["b_ih"],
            case["b_hh"], case["w_hr"], reverse, need_workspace)


def _backward_args(forward_op, shape, bias, reverse, device="cpu", dtype=torch.float64):
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in _op_args(shape, bias, reverse, True, device, dtype))
    input, batch_sizes, h0, c0, w_ih, w_hh, _b_ih, _b_hh, w_hr = args[:9]
    output, h_n, c_n, gates, cells = forward_op(*args)
    g = torch.Generator().manual_seed(9)
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(device, dtype) for t in (output, h_n, c_n)]
    base = (*grads, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, reverse, output, gates, cells)
    return [base + (mask,) for mask in ([True, True, True], [False, True, bias], [True, False, False], [False, False, False])]


@pytest.mark.parametrize("need_workspace", [True, False], ids=["workspace", "no_workspace"])
@pytest.mark.parametrize("shape, bias, reverse", FORWARD_OP_CASES)
def test_opcheck_cpu(shape, bias, reverse, need_workspace):
    torch.library.opcheck(torch.ops.bigkernels.lstm.default, _op_args(shape, bias, reverse, need_workspace))


@pytest.mark.parametrize("shape, bias, reverse", OP_CASES)
def test_opcheck_cpu_backward(shape, bias, reverse):
    for args in _backward_args(torch.ops.bigkernels.lstm.default, shape, bias, reverse):
        torch.library.opcheck(torch.ops.bigkernels.lstm_backward.default, args)


@pytest.mark.triton
@pytest.mark.parametrize("shape, bias, reverse", FORWARD_OP_CASES[:2] + FORWARD_OP_CASES[4:])
def test_opcheck_triton(shape, bias, reverse):
    dtype = torch.float32
    for need_workspace in (True, False):
        torch.library.opcheck(
            torch.ops.bigkernels.lstm_triton.default,
            _op_args(shape, bias, reverse, need_workspace, TRITON_DEVICE, dtype), atol=1e-4, rtol=1e-4,
        )
    with torch.no_grad():
        for args in _backward_args(torch.ops.bigkernels.lstm_triton.default, shape, bias, reverse, TRITON_DEVICE, dtype):
            torch.library.opcheck(torch.ops.bigkernels.lstm_backward_triton.default, args, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("shape, bias, reverse", FORWARD_OP_CASES)
def test_opcheck_cuda(shape, bias, reverse):
    for need_workspace in (True, False):
        torch.library.opcheck(
            torch.ops.bigkernels.lstm.default,
            _op_args(shape, bias, reverse, need_workspace, GPU, torch.float32), atol=1e-4, rtol=1e-4,
        )
    for args in _backward_args(torch.ops.bigkernels.lstm.default, shape, bias, reverse, GPU, torch.float32):
        torch.library.opcheck(torch.ops.bigkernels.lstm_backward.default, args, atol=1e-4, rtol=1e-4)


def test_workspace_only_when_differentiating():
    """The op keeps gates/cells for the backward only when asked; a forward run without them and
    differentiated anyway (a direct op call) recomputes them and gets the same gradients."""
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in _op_args((3, 2, 3, 4, 2, None), True, False, True))
    rows, hidden = 3 * 2, 4
    _, _, _, gates, cells = torch.ops.bigkernels.lstm(*args[:10], True)
    assert gates.shape == (rows, 4 * hidden) and cells.shape == (rows, hidden)
    _, _, _, gates, cells = torch.ops.bigkernels.lstm(*args[:10], False)
    assert gates.shape == cells.shape == (0,)
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    grads = []
    for need_workspace in (True, False):
        leaves = list(args)
        for i in tensors:
            leaves[i] = args[i].clone().requires_grad_()
        out, h_n, c_n, _, _ = torch.ops.bigkernels.lstm(*leaves[:10], need_workspace)
        grads.append(torch.autograd.grad((out * out).sum() + h_n.sum() + (c_n * 3).sum(), [leaves[i] for i in tensors]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# -------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    device = "cpu" if backend == "cpu" else TRITON_DEVICE
    case = cast(make_case(3, 2, 3, 8, 4, seed=10)[0], torch.float32, device, True)
    names = list(ARGS)

    def two_directions(*tensors):
        c = dict(zip(names, tensors))
        fwd = call(lstm_layer, c, None, False)
        rev = call(lstm_layer, c, None, True)
        return (torch.cat([fwd[0], rev[0]], -1).square().sum() + fwd[1].sum() + rev[2].sum())

    args = [case[k] for k in names]
    compiler = "aot_eager" if backend == "triton" and device == "cpu" else "inductor"
    with bigkernels.use_backend(backend):
        loss_c = torch.compile(two_directions, fullgraph=True, backend=compiler)(*args)
        grads_c = torch.autograd.grad(loss_c, args)
        loss_e = two_directions(*args)
        grads_e = torch.autograd.grad(loss_e, args)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------- bad input
def _bad(**changes):
    """A valid packed-capable float32 case (seq 3, batch 2, input 5, hidden 4, proj 3) with changes."""
    case = cast(make_case(3, 2, 5, 4, 3, seed=11)[0], torch.float32, "cpu")
    case["batch_sizes"] = None
    case.update(changes)
    return case


def _call_bad(case):
    return lstm_layer(case["input"], case["batch_sizes"], case["h0"], case["c0"], case["w_ih"], case["w_hh"],
                      case["b_ih"], case["b_hh"], case["w_hr"])


BAD_INPUTS = [
    ("not a tensor", dict(input=[[[0.0] * 5] * 2] * 3), TypeError, "input must be a torch.Tensor"),
    ("integer input", dict(input=torch.ones(3, 2, 5, dtype=torch.int64)), TypeError, "input must be a floating-point tensor"),
    ("input rank", dict(input=torch.randn(2, 5)), ValueError, "input must be 3-D"),
    ("packed input rank", dict(input=torch.randn(3, 2, 5), batch_sizes=torch.tensor([2, 1])), ValueError, "packed input must be 2-D"),
    ("batch_sizes dtype", dict(input=torch.randn(3, 5), batch_sizes=torch.tensor([2.0, 1.0])), ValueError, "batch_sizes must be a 1-D int64 CPU tensor"),
    ("batch_sizes increasing", dict(input=torch.randn(3, 5), batch_sizes=torch.tensor([1, 2])), ValueError, "batch_sizes must be non-increasing|h0 and c0 must have batch_sizes\\[0\\]"),
    ("batch_sizes sum", dict(input=torch.randn(4, 5), batch_sizes=torch.tensor([2, 1])), ValueError, "batch_sizes must sum to the packed input's rows"),
    ("packed batch", dict(input=torch.randn(4, 5), batch_sizes=torch.tensor([3, 1])), ValueError, "h0 and c0 must have batch_sizes\\[0\\] = 3 rows"),
    ("padded batch", dict(input=torch.randn(3, 4, 5)), ValueError, "h0 and c0 must have the input's batch size 4"),
    ("h0 shape", dict(h0=torch.randn(2, 4)), ValueError, "h0 must have shape \\(batch, proj_size or hidden_size\\) = \\(2, 3\\)"),
    ("c0 rank", dict(c0=torch.randn(2, 4, 1)), ValueError, "c0 must be 2-D"),
    ("w_ih input size", dict(input=torch.randn(3, 2, 6)), ValueError, "w_ih must have shape \\(4\\*hidden_size, input_size\\) = \\(16, 6\\)"),
    ("w_hh shape", dict(w_hh=torch.randn(16, 4)), ValueError, "w_hh must have shape \\(4\\*hidden_size, proj_size or hidden_size\\)"),
    ("w_hr not below hidden", dict(w_hr=torch.randn(4, 4), h0=torch.randn(2, 4), w_hh=torch.randn(16, 4)), ValueError, "w_hr must have shape \\(proj_size, hidden_size\\) with 0 < proj_size < hidden_size"),
    ("one bias", dict(b_hh=None), ValueError, "b_ih and b_hh must both be given or both be None"),
    ("bias shape", dict(b_ih=torch.randn(15)), ValueError, "b_ih must have shape \\(4\\*hidden_size,\\)"),
    ("state dtype", dict(c0=torch.randn(2, 4, dtype=torch.float64)), TypeError, "c0 must have the dtype of input"),
    ("weight dtype", dict(w_hr=torch.randn(3, 4, dtype=torch.float64)), TypeError, "w_hr must have the dtype of input"),
    ("state device", dict(h0=torch.randn(2, 3, device="meta")), ValueError, "h0 must be on the device of input"),
]


@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("what, changes, error, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_argument(backend, what, changes, error, message):
    case = _bad(**changes)
    if backend == "triton" and HAS_CUDA:  # Triton takes GPU tensors there; batch_sizes stays on the host
        case = {k: v.to(GPU) if isinstance(v, torch.Tensor) and k != "batch_sizes" and v.device.type == "cpu" else v
                for k, v in case.items()}
    with bigkernels.use_backend(backend), pytest.raises(error, match=message):
        _call_bad(case)


DIRECT_BAD = [
    ("h0 shape", dict(h0=torch.randn(2, 4)), "h0 must be"),
    ("w_ih shape", dict(w_ih=torch.randn(16, 6)), "w_ih must be"),
    ("batch_sizes increasing", dict(input=torch.randn(3, 5), batch_sizes=torch.tensor([1, 2])), "batch_sizes must be non-increasing"),
    ("batch_sizes sum", dict(input=torch.randn(4, 5), batch_sizes=torch.tensor([2, 1])), "batch_sizes sum to 3"),
    ("one bias", dict(b_hh=None), "b_ih and b_hh must both be given"),
    ("w_hr", dict(w_hr=torch.randn(3, 5)), "w_hr must be"),
    ("float16 on CPU", "half", "float32, float64 and bfloat16|Half|float16"),
]


@pytest.mark.parametrize("what, changes, message", DIRECT_BAD, ids=[b[0] for b in DIRECT_BAD])
def test_direct_op_calls_refuse_bad_input(what, changes, message):
    """torch.ops.bigkernels.lstm called directly (no Python validation) still refuses bad arguments."""
    case = _bad()
    if changes == "half":
        case = {k: v.half() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    else:
        case.update(changes)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.bigkernels.lstm(case["input"], case["batch_sizes"], case["h0"], case["c0"], case["w_ih"], case["w_hh"],
                                  case["b_ih"], case["b_hh"], case["w_hr"], False, False)


def test_backend_unavailable_is_an_error_not_a_fallback():
    with bigkernels.use_backend("cuda"), pytest.raises(bigkernels.BackendUnavailable, match="cuda backend takes CUDA tensors"):
        _call_bad(_bad())


@pytest.mark.triton
def test_triton_launchers_refuse_mixed_devices():
    kernels = pytest.importorskip("bigkernels.triton.lstm")
    x, h, c = torch.randn(3, 2, 3), torch.randn(2, 4), torch.randn(2, 4)
    w_ih, w_hh = torch.randn(16, 3), torch.randn(16, 4, device="meta")
    with pytest.raises(RuntimeError, match="lstm_triton: .* input is on cpu and w_hh on meta"):
        kernels.lstm_forward(x, None, h, c, w_ih, w_hh, None, None, None, False, False)
