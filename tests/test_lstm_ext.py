"""bigkernels::lstm_ext and bigkernels.nn.LSTM(layer_norm=True, zoneout=p): numerics and every gradient
(LayerNorm parameters included) against the float64 reference, with "stock" = the reference in the
test dtype (torch has no such module); gradcheck, opcheck, torch.compile, zoneout's statistics and
reproducibility, packed/bidirectional/multi-layer modules, the Triton path and bad input."""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import bigkernels
from bigkernels.ops.lstm_ext import lstm_layer_ext
from conftest import HAS_CUDA
from lstm_cases import cast, make_case, shape_id, upstream_grads
from numerics import assert_matches

TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # on CPU: the Triton interpreter
ARGS = ("input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
LN = ("ln_ih_w", "ln_ih_b", "ln_hh_w", "ln_hh_b", "ln_c_w", "ln_c_b")

SHAPES = [
    (5, 3, 4, 7, 0, None),
    (4, 2, 3, 6, 3, None),
    (6, 4, 5, 7, 0, (6, 5, 2, 1)),
    (3, 3, 2, 6, 4, (3, 3, 1)),
    (3, 0, 2, 3, 0, None),
]
TINY_SHAPES = [(3, 2, 3, 8, 0, None), (3, 2, 3, 8, 4, (3, 2))]
# (id, layer_norm, zoneout, training)
OPTIONS = [
    ("ln", True, 0.0, False),
    ("zoneout-train", False, (0.3, 0.2), True),
    ("zoneout-eval", False, 0.25, False),
    ("ln-zoneout-train", True, (0.2, 0.35), True),
]


def ext_case(shape, layer_norm, seed):
    """make_case's layer plus LayerNorm gains near 1 and biases near 0, never exactly 1 / 0."""
    case, batch_sizes = make_case(*shape, seed=seed)
    if layer_norm:
        g = torch.Generator().manual_seed(seed + 1)
        hidden = shape[3]
        for name, size in zip(LN, (4, 4, 4, 4, 1, 1)):
            base = 1.0 if name.endswith("_w") else 0.0
            case[name] = base + 0.4 * (torch.rand(size * hidden, generator=g, dtype=torch.float64) - 0.5)
    return case, batch_sizes


def run(case, batch_sizes, reverse, zoneout, training, seed, backend, upstream=None):
    """lstm_layer_ext on `backend` with torch seeded (the zoneout masks), outputs and gradients."""
    names = [k for k in ARGS + LN if case.get(k) is not None]
    ln = tuple(case[k] for k in LN) if "ln_ih_w" in case else None
    torch.manual_seed(seed)
    with bigkernels.use_backend(backend):
        outs = lstm_layer_ext(case["input"], batch_sizes, case["h0"], case["c0"], case["w_ih"], case["w_hh"],
                              case["b_ih"], case["b_hh"], case["w_hr"], reverse, layer_norm=ln, zoneout=zoneout,
                              training=training)
        if upstream is None:
            return outs, {}
        grads = torch.autograd.grad(outs, [case[k] for k in names], upstream)
    return outs, dict(zip(names, grads))


def check_against_reference(backend, device, dtypes, shape, option, reverse):
    _, layer_norm, zoneout, training = option
    for seed, dtype in enumerate(dtypes):
        case64, batch_sizes = ext_case(shape, layer_norm, seed)
        ref, _ = run(cast(case64, torch.float64, "cpu"), batch_sizes, reverse, zoneout, training, seed, "reference")
        upstream = upstream_grads(ref, dtype, device, seed=100 + seed)
        up64 = [u.to("cpu", torch.float64) for u in upstream]
        ref, ref_grads = run(cast(case64, torch.float64, "cpu", True), batch_sizes, reverse, zoneout, training, seed,
                             "reference", up64)
        stock, stock_grads = run(cast(case64, dtype, device, True), batch_sizes, reverse, zoneout, training, seed,
                                 "reference", upstream)
        ours, our_grads = run(cast(case64, dtype, device, True), batch_sizes, reverse, zoneout, training, seed,
                              backend, upstream)
        for name, o, s, r in zip(("output", "h_n", "c_n"), ours, stock, ref):
            assert o.device.type == torch.device(device).type
            assert_matches(f"{backend}/{dtype}/{name}", o, s, r)
        for name, r in ref_grads.items():
            assert_matches(f"{backend}/{dtype}/grad_{name}", our_grads[name], stock_grads[name], r)


# Every shape with every option; half of them in the reverse direction, alternating.
CPU_CASES = [
    pytest.param(shape, option, (k + j) % 2 == 1, id=f"{option[0]}-{shape_id(shape)}-{'rev' if (k + j) % 2 else 'fwd'}")
    for k, shape in enumerate(SHAPES)
    for j, option in enumerate(OPTIONS)
]


@pytest.mark.parametrize("shape, option, reverse", CPU_CASES)
def test_cpu_matches_reference(shape, option, reverse, poison_empty):
    check_against_reference("cpu", "cpu", (torch.float32, torch.float64, torch.bfloat16), shape, option, reverse)


@pytest.mark.triton
@pytest.mark.parametrize("shape", TINY_SHAPES, ids=shape_id)
@pytest.mark.parametrize("option", [OPTIONS[0], OPTIONS[3]], ids=[OPTIONS[0][0], OPTIONS[3][0]])
def test_triton_matches_reference(shape, option):
    dtypes = (torch.float32, torch.bfloat16) if HAS_CUDA else (torch.float32,)
    check_against_reference("triton", TRITON_DEVICE, dtypes, shape, option, reverse=shape[-1] is not None)


def _strided_states(case, layout):
    """case with h0 and c0 as views of other strides (same shapes): "expanded", row 0 of a (B, H)
    buffer over the whole batch; "batch_first", rows of a (B, 2, H) buffer, as a batch-first model's
    slice of its per-layer states. Gradients are taken with respect to the views themselves."""
    case = dict(case)
    for name in ("h0", "c0"):
        t = case[name].detach()
        if layout == "expanded":
            case[name] = t.clone().requires_grad_()[:1].expand_as(t)
        else:
            buffer = torch.stack([torch.full_like(t, 0.5), t], 1).requires_grad_()
            case[name] = buffer[:, 1]
    return case


@pytest.mark.triton
@pytest.mark.parametrize("layout", ["expanded", "batch_first"])
def test_triton_gradients_with_strided_states(layout):
    """The backward reads c0 densely: an expanded or batch-first c0 must be made contiguous first
    (the forward always did), or grad_c0, grad_w_hh, ... come out wrong."""
    shape, (_, layer_norm, zoneout, training) = (3, 3, 2, 8, 0, None), OPTIONS[3]
    case64, batch_sizes = ext_case(shape, layer_norm, seed=31)
    ref, _ = run(_strided_states(cast(case64, torch.float64, "cpu"), layout), batch_sizes, False, zoneout,
                 training, 31, "reference")
    upstream = upstream_grads(ref, torch.float32, TRITON_DEVICE, seed=131)
    up64 = [u.to("cpu", torch.float64) for u in upstream]
    outs = {}
    for key, dtype, device, backend, up in (("ref", torch.float64, "cpu", "reference", up64),
                                            ("stock", torch.float32, TRITON_DEVICE, "reference", upstream),
                                            ("ours", torch.float32, TRITON_DEVICE, "triton", upstream)):
        assert not _strided_states(cast(case64, dtype, device, True), layout)["c0"].is_contiguous()
        outs[key] = run(_strided_states(cast(case64, dtype, device, True), layout), batch_sizes, False, zoneout,
                        training, 31, backend, up)
    (_, ref_grads), (_, stock_grads), (_, our_grads) = outs["ref"], outs["stock"], outs["ours"]
    assert {"h0", "c0", "w_hh"} <= set(ref_grads)
    for name, r in ref_grads.items():
        assert_matches(f"triton/{layout}/grad_{name}", our_grads[name], stock_grads[name], r)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_half_gradients_match_reference(dtype):
    """fp16/bf16 outputs and every gradient (LayerNorm gains included) against float64, by the stock
    rule. The step kernels have no tl.dot, so bf16 is right under the interpreter too."""
    check_against_reference("triton", TRITON_DEVICE, (dtype,), (4, 3, 5, 16, 0, None), OPTIONS[3], reverse=True)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_keeps_layer_norm_statistics_in_float32(dtype):
    """As stock LayerNorm: the normalised activations and 1/std saved for the backward stay float32
    for half inputs (rounded to fp16/bf16 they would carry that rounding into every LN gradient)."""
    args = _op_args((3, 2, 3, 8, 0, None), True, True, False, True, TRITON_DEVICE, dtype)
    with torch.no_grad():
        output, _, _, gates, _, norms = torch.ops.bigkernels.lstm_ext_triton.default(*args)
    assert output.dtype == gates.dtype == dtype
    assert norms.dtype == torch.float32 and norms.shape == (6, 5 * 8 + 2)
    # The two 1/std columns carry more than the storage type's bits.
    rstd = norms[:, 5 * 8:]
    assert (rstd != rstd.to(dtype).float()).any()


def test_reference_without_options_is_the_plain_layer():
    from bigkernels import reference

    case, batch_sizes = make_case(4, 3, 2, 5, 2, (4, 2, 1), seed=3)
    args = [case[k] for k in ARGS]
    for reverse in (False, True):
        plain = reference.lstm_layer(args[0], batch_sizes, *args[1:], reverse)
        ext = reference.lstm_layer_ext(args[0], batch_sizes, *args[1:], reverse)
        for a, b in zip(plain, ext):
            torch.testing.assert_close(a, b, atol=1e-14, rtol=0)  # the biases are added in another order


# ----------------------------------------------------------------------------------- gradcheck
GRADCHECK = [
    pytest.param((3, 3, 2, 3, 0, (3, 2, 1)), True, (0.3, 0.4), True, id="ln-zoneout-packed-rev"),
    pytest.param((2, 2, 2, 4, 2, None), True, 0.3, False, id="ln-proj-zoneout"),
    pytest.param((3, 2, 3, 4, 2, None), False, (0.4, 0.5), False, id="zoneout-proj"),
]


@pytest.mark.parametrize("shape, layer_norm, zoneout, reverse", GRADCHECK)
def test_gradcheck_cpu_float64(shape, layer_norm, zoneout, reverse):
    """Training-mode zoneout under a fixed seed: gradcheck's finite differences rerun the forward
    (same seed, same masks) and compare with the analytical backward, which must use those masks."""
    case, batch_sizes = ext_case(shape, layer_norm, seed=5)
    case = cast(case, torch.float64, "cpu", True)
    names = [k for k in ARGS + LN if case.get(k) is not None]

    def fn(*tensors):
        outs, _ = run(dict(case, **dict(zip(names, tensors))), batch_sizes, reverse, zoneout, True, 7, "cpu")
        return outs

    assert torch.autograd.gradcheck(fn, [case[k] for k in names], fast_mode=True)


# ------------------------------------------------------------------------------------- opcheck
def _op_args(shape, layer_norm, masks, reverse, need_workspace, device="cpu", dtype=torch.float64):
    case, batch_sizes = ext_case(shape, layer_norm, seed=8)
    case = cast(case, dtype, device, True)
    rows = case["input"].shape[0] * (1 if batch_sizes is not None else case["input"].shape[1])
    g = torch.Generator().manual_seed(9)
    cell_mask = (torch.rand(rows, shape[3], generator=g) < 0.3).to(device, dtype) if masks else None
    hidden_mask = (torch.rand(rows, shape[4] or shape[3], generator=g) < 0.3).to(device, dtype) if masks else None
    ln = tuple(case.get(k) for k in LN)
    return (case["input"], batch_sizes, case["h0"], case["c0"], case["w_ih"], case["w_hh"], case["b_ih"],
            case["b_hh"], case["w_hr"], *ln, cell_mask, hidden_mask, 0.0 if masks else 0.2,
            0.0 if masks else 0.1, reverse, need_workspace)


OP_CASES = [
    pytest.param((3, 2, 3, 4, 0, None), True, True, False, id="ln-masks"),
    pytest.param((3, 2, 3, 5, 3, None), True, False, True, id="ln-proj-eval-rev"),
    pytest.param((3, 3, 2, 4, 0, (3, 2, 1)), False, True, True, id="zoneout-packed-rev"),
]


def _backward_args(forward_op, args):
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    (input, batch_sizes, h0, c0, w_ih, w_hh, _b_ih, _b_hh, w_hr, ln_ih_w, _ln_ih_b, ln_hh_w, _ln_hh_b, ln_c_w, ln_c_b,
     cell_mask, hidden_mask, zc, zh, reverse, _) = args
    output, h_n, c_n, gates, cells, norms = forward_op(*args[:-1], True)
    g = torch.Generator().manual_seed(10)
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype) for t in (output, h_n, c_n)]
    return (*grads, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, cell_mask,
            hidden_mask, zc, zh, reverse, output, gates, cells, norms)


@pytest.mark.parametrize("shape, layer_norm, masks, reverse", OP_CASES)
def test_opcheck_cpu(shape, layer_norm, masks, reverse):
    for need_workspace in (True, False):
        torch.library.opcheck(torch.ops.bigkernels.lstm_ext.default,
                              _op_args(shape, layer_norm, masks, reverse, need_workspace))
    args = _backward_args(torch.ops.bigkernels.lstm_ext.default, _op_args(shape, layer_norm, masks, reverse, True))
    torch.library.opcheck(torch.ops.bigkernels.lstm_ext_backward.default, args)


@pytest.mark.triton
def test_opcheck_triton():
    dtype = torch.float32
    shape, layer_norm, masks, reverse = OP_CASES[0].values
    args = _op_args((3, 2, 3, 8, 4, None), layer_norm, masks, reverse, True, TRITON_DEVICE, dtype)
    torch.library.opcheck(torch.ops.bigkernels.lstm_ext_triton.default, args, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        bargs = _backward_args(torch.ops.bigkernels.lstm_ext_triton.default, args)
    torch.library.opcheck(torch.ops.bigkernels.lstm_ext_backward_triton.default, bargs, atol=1e-4, rtol=1e-4)


def test_workspace_recomputed_when_missing():
    """A forward run without the workspace and differentiated anyway recomputes it: same gradients."""
    base = _op_args((3, 2, 3, 4, 2, None), True, True, False, True)
    grads = []
    for need_workspace in (True, False):
        args = [a.detach().clone().requires_grad_(a.is_floating_point() and k < 15) if isinstance(a, torch.Tensor)
                and k != 1 else a for k, a in enumerate(base)]
        out, h_n, c_n, *_ = torch.ops.bigkernels.lstm_ext(*args[:-1], need_workspace)
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        grads.append(torch.autograd.grad((out * out).sum() + h_n.sum() + (c_n * 3).sum(), leaves))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------- module
def _module_pair(**kwargs):
    torch.manual_seed(0)
    ours = bigkernels.nn.LSTM(**kwargs)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.startswith("layer_norm"):
                p.add_(0.2 * torch.randn_like(p))  # gains and biases away from 1 / 0
    ref = bigkernels.nn.LSTM(**kwargs, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_module_packed_bidirectional_multilayer(training):
    """2 layers, bidirectional, packed ragged input, proj_size, both options: the CPU kernels against
    the same module on the reference backend in float64 (and float32 as "stock"), under one seed."""
    kwargs = dict(input_size=3, hidden_size=6, num_layers=2, bidirectional=True, proj_size=4, layer_norm=True,
                  zoneout=(0.25, 0.15))
    ours, ref64 = _module_pair(**kwargs)
    stock = bigkernels.nn.LSTM(**kwargs)
    stock.load_state_dict(ours.state_dict())
    for m in (ours, ref64, stock):
        m.train(training)
    x = torch.randn(5, 3, 3)
    packed = pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
    results = []
    for module, backend, dtype in ((ours, "cpu", torch.float32), (stock, "reference", torch.float32),
                                   (ref64, "reference", torch.float64)):
        torch.manual_seed(3)
        with bigkernels.use_backend(backend):
            out, (h, c) = module(packed.to(dtype))
            loss = (out.data * torch.linspace(-1, 1, out.data.numel()).view_as(out.data).to(dtype)).sum() + h.sum() + c.sum()
            grads = torch.autograd.grad(loss, list(module.parameters()))
        results.append([out.data, h, c, *grads])
    names = ["output", "h_n", "c_n"] + [n for n, _ in ours.named_parameters()]
    # A parameter's gradient sums over every packed row of every step (11 here) and, through the
    # recurrence, over the steps after it: its slack grows with that count (AMD and Intel sum in
    # different orders; bias_ih_l0_reverse was 1.01x the single-term bound on an EPYC).
    rows = int(packed.batch_sizes.sum())
    for index, (name, o, s, r) in enumerate(zip(names, *results)):
        assert_matches(name, o, s, r, reduction=rows if index >= 3 else 1)


def test_module_parameters_and_drop_in_contract():
    stock = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True)
    plain = bigkernels.nn.LSTM(3, 5, num_layers=2, bidirectional=True, zoneout=0.1)
    assert list(plain.state_dict()) == list(stock.state_dict())  # zoneout adds no parameter
    ln = bigkernels.nn.LSTM(3, 5, num_layers=2, bidirectional=True, layer_norm=True)
    extra = [k for k in ln.state_dict() if k not in stock.state_dict()]
    assert "layer_norm_ih_weight_l0" in extra and "layer_norm_cell_bias_l1_reverse" in extra
    assert len(extra) == 6 * 4
    assert ln.layer_norm_hh_weight_l1.shape == (20,) and ln.layer_norm_cell_weight_l0.shape == (5,)
    for name, p in ln.named_parameters():
        if name.startswith("layer_norm"):
            assert (p == (1.0 if "weight" in name else 0.0)).all(), name
    ln.reset_parameters()
    assert (ln.layer_norm_cell_weight_l0 == 1).all() and (ln.layer_norm_ih_bias_l1 == 0).all()
    assert "layer_norm=True" in repr(ln) and "zoneout=(0.1, 0.1)" in repr(plain)


def test_compile_fullgraph_module():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = bigkernels.nn.LSTM(3, 8, num_layers=2, batch_first=True, layer_norm=True, zoneout=(0.2, 0.1))
    x = torch.randn(2, 4, 3)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.eval()
    out_c, (h_c, _) = compiled(x)
    out_e, (h_e, _) = model(x)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(h_c, h_e)
    model.train()
    out, (h, c) = compiled(x)  # training: fresh masks inside the graph, gradients through it
    (out.sum() + c.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------------------------- zoneout
def test_zoneout_eval_is_the_expectation_exactly():
    """eval mode with zoneout p equals the layer with the constant keep weight p (no randomness)."""
    model = bigkernels.nn.LSTM(3, 6, zoneout=(0.3, 0.6), dtype=torch.float64).eval()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    w = [model.weight_ih_l0, model.weight_hh_l0, model.bias_ih_l0, model.bias_hh_l0]
    from bigkernels import reference

    with torch.no_grad():
        out, (h, c) = model(x)
        h0 = torch.zeros(2, 6, dtype=torch.float64)
        want = reference.lstm_layer_ext(x, None, h0, h0, *w, zoneout_cell=0.3, zoneout_hidden=0.6)
        again = model(x)[0]
    torch.testing.assert_close(out, want[0], atol=1e-13, rtol=0)
    torch.testing.assert_close(c[0], want[2], atol=1e-13, rtol=0)
    assert torch.equal(out, again)


def test_zoneout_training_reproducible_under_a_seed():
    model = bigkernels.nn.LSTM(3, 6, num_layers=2, zoneout=0.3)
    x = torch.randn(5, 2, 3)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(model(x)[0])
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("p", [0.15, 0.6])
def test_zoneout_keep_rate(p):
    """In training a unit keeps its previous h exactly with probability p (hidden zoneout only)."""
    torch.manual_seed(4)
    model = bigkernels.nn.LSTM(4, 64, zoneout=(0.0, p))
    x = torch.randn(40, 16, 4)
    with torch.no_grad():
        out, _ = model(x)
    kept = (out[1:] == out[:-1]).double().mean().item()
    n = out[1:].numel()
    assert abs(kept - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3, (kept, p)


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("zoneout, error, message", [
    (1.0, ValueError, "zoneout probabilities must be in \\[0, 1\\)"),
    (-0.1, ValueError, "zoneout probabilities must be in \\[0, 1\\)"),
    ((0.1, 1.5), ValueError, "zoneout probabilities must be in \\[0, 1\\)"),
    ((0.1,), TypeError, "zoneout must be a float or a pair"),
    ("0.1", TypeError, "zoneout must be a float or a pair"),
])
def test_bad_zoneout(zoneout, error, message):
    with pytest.raises(error, match=message):
        bigkernels.nn.LSTM(3, 4, zoneout=zoneout)
    case, _ = make_case(2, 1, 3, 4, seed=1)
    with pytest.raises(error, match=message):
        lstm_layer_ext(*[case[k] for k in ARGS[:5]], None, None, None, zoneout=zoneout)


def test_bad_layer_norm():
    with pytest.raises(TypeError, match="layer_norm must be a bool"):
        bigkernels.nn.LSTM(3, 4, layer_norm="yes")
    case, _ = ext_case((2, 1, 3, 4, 0, None), True, seed=1)
    args = [case[k] for k in ("input",)] + [None] + [case[k] for k in ARGS[1:]]
    ln = [case[k] for k in LN]
    with pytest.raises(ValueError, match="layer_norm must be None or a tuple of 6"):
        lstm_layer_ext(*args, layer_norm=ln[:5])
    with pytest.raises(ValueError, match="layer_norm ln_c_w must have shape \\(hidden_size,\\) = \\(4,\\)"):
        lstm_layer_ext(*args, layer_norm=ln[:4] + [torch.ones(5, dtype=torch.float64), ln[5]])
    with pytest.raises(TypeError, match="layer_norm ln_hh_b must have the dtype of input"):
        lstm_layer_ext(*args, layer_norm=ln[:3] + [ln[3].float()] + ln[4:])


def test_direct_op_refuses_bad_masks_and_probabilities():
    args = list(_op_args((3, 2, 3, 4, 0, None), True, True, False, False))
    bad_mask = list(args)
    bad_mask[15] = args[15][:-1]
    with pytest.raises(RuntimeError, match="cell_mask must be \\[rows, 4\\]"):
        torch.ops.bigkernels.lstm_ext(*bad_mask)
    bad_p = list(args)
    bad_p[17] = 1.0
    with pytest.raises(RuntimeError, match="zoneout probabilities must be in \\[0, 1\\)"):
        torch.ops.bigkernels.lstm_ext(*bad_p)
    some_ln = list(args)
    some_ln[11] = None
    with pytest.raises(RuntimeError, match="layer-norm parameters must all be given or all be None"):
        torch.ops.bigkernels.lstm_ext(*some_ln)


def test_module_unbatched_and_empty_sequence():
    """Unbatched input is batch 1; an empty sequence returns the initial state (as the plain module)."""
    model = bigkernels.nn.LSTM(3, 5, layer_norm=True, zoneout=0.2).eval()
    x = torch.randn(4, 3)
    h0, c0 = torch.randn(1, 5), torch.randn(1, 5)
    out, (h, c) = model(x, (h0, c0))
    out_b, (h_b, c_b) = model(x.unsqueeze(1), (h0.unsqueeze(1), c0.unsqueeze(1)))
    torch.testing.assert_close(out, out_b.squeeze(1))
    torch.testing.assert_close(h, h_b.squeeze(1))
    empty, (h_e, c_e) = model(torch.randn(0, 2, 3), (h0.expand(1, 2, 5), c0.expand(1, 2, 5)))
    assert empty.shape == (0, 2, 5)
    torch.testing.assert_close(h_e, h0.expand(1, 2, 5))
    torch.testing.assert_close(c_e, c0.expand(1, 2, 5))


@pytest.mark.triton
def test_triton_module_bidirectional_packed():
    """The module on the Triton backend (interpreter on CPU): 2 layers, bidirectional, packed."""
    kwargs = dict(input_size=2, hidden_size=4, num_layers=2, bidirectional=True, layer_norm=True, zoneout=(0.2, 0.3))
    ours, _ = _module_pair(**kwargs)
    ours.to(TRITON_DEVICE)
    x = pack_padded_sequence(torch.randn(3, 2, 2, device=TRITON_DEVICE), torch.tensor([3, 2]))
    results = []
    for backend in ("triton", "reference"):
        torch.manual_seed(5)
        with bigkernels.use_backend(backend):
            out, (h, c) = ours(x)
            grads = torch.autograd.grad(out.data.square().sum() + h.sum() + c.sum(), list(ours.parameters()))
        results.append([out.data, h, c, *grads])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_autocast_cpu_runs_in_the_autocast_dtype():
    """As stock nn.LSTM under CPU autocast: bfloat16 outputs, float32 gradients of the parameters."""
    model = bigkernels.nn.LSTM(3, 5, layer_norm=True, zoneout=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = model(torch.randn(4, 2, 3))
    assert out.dtype == h.dtype == c.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert model.layer_norm_cell_weight_l0.grad.dtype == torch.float32
    assert torch.isfinite(model.layer_norm_hh_weight_l0.grad).all()


@pytest.mark.triton
def test_triton_launchers_refuse_mixed_devices():
    kernels = pytest.importorskip("bigkernels.triton.lstm_ext")
    x, h, c = torch.randn(3, 2, 3), torch.randn(2, 4), torch.randn(2, 4)
    w_ih, w_hh = torch.randn(16, 3), torch.randn(16, 4)
    mask = torch.ones(6, 4, device="meta")
    with pytest.raises(RuntimeError, match="lstm_ext_triton: .* input is on cpu and cell_mask on meta"):
        kernels.lstm_ext_forward(x, None, h, c, w_ih, w_hh, None, None, None, *(None,) * 6, mask, None, 0.0, 0.0,
                                 False, False)
