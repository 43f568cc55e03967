"""bigkernels.nn.LSTM as a drop-in for torch.nn.LSTM: stock weights loaded both ways, the same outputs,
states and gradients over a grid of configurations and input forms, dropout, torch.compile, bad input."""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import bigkernels
from bigkernels.nn import LSTM
from conftest import HAS_CUDA
from numerics import assert_matches

TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # on CPU: the Triton interpreter
TINY = not HAS_CUDA  # the interpreter is slow: Triton cases on CPU use tiny sizes

# (backend, device). The numerics are checked in float32, the dtype every backend supports.
BACKENDS = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("triton", TRITON_DEVICE, id="triton", marks=pytest.mark.triton),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
]


@dataclass(frozen=True)
class Config:
    """One module configuration and input form of the grid."""

    num_layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    proj_size: int = 0
    bias: bool = True
    form: str = "padded"  # "padded", "packed_sorted", "packed_unsorted" or "unbatched"
    with_state: bool = True
    training: bool = False  # training: dropout 0, must equal eval; eval: dropout 0.5, must be ignored
    # sizes
    input_size: int = 5
    hidden_size: int = 7
    seq_len: int = 6
    lengths: tuple[int, ...] = (6, 2, 5, 1)  # ragged, unsorted (sorted for "packed_sorted"); batch = len(lengths)

    def __str__(self) -> str:
        parts = [f"L{self.num_layers}", "bi" if self.bidirectional else "uni", self.form]
        parts += ["bf"] if self.batch_first else []
        parts += [f"proj{self.proj_size}"] if self.proj_size else []
        parts += [] if self.bias else ["nobias"]
        parts += ["state" if self.with_state else "nostate"]
        parts += ["train"] if self.training else []
        return "-".join(parts)


FORMS = ("padded", "packed_sorted", "packed_unsorted", "unbatched")


def _grid() -> list[Config]:
    """Every (layers, direction, form, projection) combination; the on/off options (batch_first, bias,
    given state, training) drawn by a seeded generator so that they do not move in lockstep with the
    product's axes, and every value of each occurs."""
    draw = random.Random(0)
    grid = [
        Config(num_layers=layers, bidirectional=bi, form=form, proj_size=proj, batch_first=draw.random() < 0.5,
               bias=draw.random() < 0.7, with_state=draw.random() < 0.5, training=draw.random() < 0.5)
        for layers, bi, form, proj in itertools.product((1, 2, 3), (False, True), FORMS, (0, 3))
    ]
    for option in ("batch_first", "bias", "with_state", "training"):
        assert {getattr(c, option) for c in grid} == {False, True}, option
    return grid


GRID = _grid()
# The same forms at the interpreter's sizes (seq 3, batch 2, hidden 8).
TINY_GRID = [
    replace(c, input_size=3, hidden_size=8, seq_len=3, lengths=(2, 3),
            proj_size=min(c.proj_size, 4), num_layers=min(c.num_layers, 2))
    for c in (Config(), Config(num_layers=2, bidirectional=True, proj_size=3, form="packed_unsorted"),
              Config(bidirectional=True, form="unbatched", with_state=False),
              Config(num_layers=2, batch_first=True, bias=False, form="packed_sorted", training=True))
]


def make_modules(cfg: Config, device, dtype=torch.float32, dropout=0.0, seed=0):
    """(stock, float64 copy of stock on the CPU, ours loaded from stock's state_dict)."""
    torch.manual_seed(seed)
    kwargs = dict(num_layers=cfg.num_layers, bias=cfg.bias, batch_first=cfg.batch_first, dropout=dropout,
                  bidirectional=cfg.bidirectional, proj_size=cfg.proj_size)
    stock = torch.nn.LSTM(cfg.input_size, cfg.hidden_size, **kwargs, device=device, dtype=dtype)
    ref64 = torch.nn.LSTM(cfg.input_size, cfg.hidden_size, **kwargs, dtype=torch.float64)
    ref64.load_state_dict({k: v.double().cpu() for k, v in stock.state_dict().items()})
    ours = LSTM(cfg.input_size, cfg.hidden_size, **kwargs, device=device, dtype=dtype)
    ours.load_state_dict(stock.state_dict())
    for m in (stock, ref64, ours):
        m.train(cfg.training)
    return stock, ref64, ours


def make_data(cfg: Config, seed=1):
    """Float64 CPU input, states and upstream gradients for every output, all fresh random (no zeros)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(cfg.lengths)
    dirs = 2 if cfg.bidirectional else 1
    out_size = cfg.proj_size or cfg.hidden_size
    unbatched = cfg.form == "unbatched"

    def rnd(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1

    if unbatched:
        x = rnd(cfg.seq_len, cfg.input_size)
        out_shape = (cfg.seq_len, dirs * out_size)
        state = ((cfg.num_layers * dirs, out_size), (cfg.num_layers * dirs, cfg.hidden_size))
    else:
        x = rnd(cfg.seq_len, batch, cfg.input_size)
        out_shape = (cfg.seq_len, batch, dirs * out_size)
        if cfg.batch_first:
            x = x.transpose(0, 1).contiguous()
            out_shape = (batch, cfg.seq_len, dirs * out_size)
        state = ((cfg.num_layers * dirs, batch, out_size), (cfg.num_layers * dirs, batch, cfg.hidden_size))
    return dict(
        x=x,
        hx=(rnd(*state[0]), rnd(*state[1]) * 2) if cfg.with_state else None,
        grad_out=torch.randn(out_shape, generator=g, dtype=torch.float64),
        grad_h=torch.randn(state[0], generator=g, dtype=torch.float64),
        grad_c=torch.randn(state[1], generator=g, dtype=torch.float64),
    )


def run(module, cfg: Config, data, dtype, device):
    """Forward + backward of `module`: ([output (padded), h_n, c_n], {name: gradient}, raw output)."""
    x = data["x"].to(device, dtype).requires_grad_()
    hx = tuple(t.to(device, dtype).requires_grad_() for t in data["hx"]) if data["hx"] is not None else None
    inp = x
    if cfg.form.startswith("packed"):
        enforce_sorted = cfg.form == "packed_sorted"
        lengths = torch.tensor(sorted(cfg.lengths, reverse=True) if enforce_sorted else cfg.lengths)
        inp = pack_padded_sequence(x, lengths, batch_first=cfg.batch_first, enforce_sorted=enforce_sorted)
    raw, (h, c) = module(inp, hx)
    out = pad_packed_sequence(raw, batch_first=cfg.batch_first)[0] if isinstance(raw, PackedSequence) else raw
    loss = sum(
        (t * data[k].to(device, dtype)).sum() for t, k in ((out, "grad_out"), (h, "grad_h"), (c, "grad_c"))
    )
    names = ["input"] + (["h_0", "c_0"] if hx is not None else []) + [n for n, _ in module.named_parameters()]
    wrt = [x] + (list(hx) if hx is not None else []) + list(module.parameters())
    return [out, h, c], dict(zip(names, torch.autograd.grad(loss, wrt))), raw


def grid_cases():
    """The full grid on every backend except Triton under the interpreter, which gets the tiny one."""
    for param in BACKENDS:
        backend, device = param.values
        grid = TINY_GRID if backend == "triton" and TINY else GRID
        for cfg in grid:
            yield pytest.param(backend, device, cfg, id=f"{param.id}-{cfg}", marks=param.marks)


@pytest.mark.parametrize("backend, device, cfg", grid_cases())
def test_matches_stock_and_float64(backend, device, cfg, poison_empty):
    dtype = torch.float32
    # Eval mode ignores dropout: give the eval cases some (dropout with one layer only warns).
    dropout = 0.5 if not cfg.training and cfg.num_layers > 1 else 0.0
    stock, ref64, ours = make_modules(cfg, device, dtype, dropout=dropout)
    data = make_data(cfg)
    ref_out, ref_grads, _ = run(ref64, cfg, data, torch.float64, "cpu")
    stock_out, stock_grads, stock_raw = run(stock, cfg, data, dtype, device)
    with bigkernels.use_backend(backend):
        ours_out, ours_grads, ours_raw = run(ours, cfg, data, dtype, device)
    assert type(ours_raw) is type(stock_raw)
    if isinstance(stock_raw, PackedSequence):
        # The same packing: batch_sizes and both permutations are passed through untouched.
        for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            a, b = getattr(ours_raw, field), getattr(stock_raw, field)
            assert (a is None and b is None) or torch.equal(a, b), field
    for name, o, s, r in zip(("output", "h_n", "c_n"), ours_out, stock_out, ref_out):
        assert o.device.type == device
        assert_matches(f"{backend}/{cfg}/{name}", o, s, r)
    assert ours_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_matches(f"{backend}/{cfg}/grad_{name}", ours_grads[name], stock_grads[name], ref_grads[name])


# --------------------------------------------------------------------------- module contract
def test_is_an_rnnbase_with_the_stock_state_dict_both_ways():
    kwargs = dict(num_layers=2, bidirectional=True, proj_size=3)
    torch.manual_seed(0)
    stock = torch.nn.LSTM(5, 7, **kwargs)
    ours = LSTM(5, 7, **kwargs)
    assert isinstance(ours, torch.nn.RNNBase) and ours.mode == "LSTM"
    assert list(ours.state_dict()) == list(stock.state_dict())
    assert {"weight_ih_l0", "weight_hh_l0_reverse", "weight_hr_l0", "bias_ih_l1_reverse"} <= set(ours.state_dict())
    assert repr(ours) == repr(stock)
    ours.load_state_dict(stock.state_dict())
    back = torch.nn.LSTM(5, 7, **kwargs)
    back.load_state_dict(ours.state_dict())
    for a, b in zip(back.parameters(), stock.parameters()):
        assert torch.equal(a, b)
    assert [[w.shape for w in ws] for ws in ours.all_weights] == [[w.shape for w in ws] for ws in stock.all_weights]
    ours.flatten_parameters()  # a no-op on the CPU, as for stock


def test_constructor_matches_stock_positionally():
    args = (4, 6, 2, False, True, 0.25, True, 3)  # every argument nn.LSTM takes positionally
    ours, stock = LSTM(*args, dtype=torch.float64), torch.nn.LSTM(*args, dtype=torch.float64)
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional", "proj_size"):
        assert getattr(ours, attr) == getattr(stock, attr), attr
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in stock.named_parameters()
    ]


def test_functional_call_and_replaced_weights_are_used():
    """torch.func.functional_call swaps `_parameters` entries behind RNNBase's weight cache."""
    torch.manual_seed(2)
    stock, ours = torch.nn.LSTM(3, 4, num_layers=2), LSTM(3, 4, num_layers=2)
    ours.load_state_dict(stock.state_dict())
    other = {k: torch.randn_like(v) for k, v in stock.state_dict().items()}
    x = torch.randn(5, 2, 3)
    got = torch.func.functional_call(ours, other, (x,))
    want = torch.func.functional_call(stock, other, (x,))
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    ours.weight_hh_l1 = torch.nn.Parameter(other["weight_hh_l1"])
    stock.weight_hh_l1 = torch.nn.Parameter(other["weight_hh_l1"])
    torch.testing.assert_close(ours(x)[0], stock(x)[0])


def test_inference_modes_and_dtypes():
    torch.manual_seed(3)
    stock, ours = torch.nn.LSTM(3, 5, bidirectional=True), LSTM(3, 5, bidirectional=True)
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(4, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], stock(x)[0])
    with torch.inference_mode():
        torch.testing.assert_close(ours(x)[1], stock(x)[1])
    ours.double(), stock.double()
    torch.testing.assert_close(ours(x.double())[0], stock(x.double())[0])


def test_empty_batch_like_stock():
    torch.manual_seed(4)
    stock, ours = torch.nn.LSTM(3, 5, num_layers=2), LSTM(3, 5, num_layers=2)
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(4, 0, 3)
    (o, (h, c)), (so, (sh, sc)) = ours(x), stock(x)
    assert o.shape == so.shape and h.shape == sh.shape and c.shape == sc.shape


def test_empty_sequence_returns_the_initial_state():
    """Stock raises for seq_len 0; ours returns an empty output and the state it was given."""
    ours = LSTM(3, 5, num_layers=2, bidirectional=True)
    h0, c0 = torch.randn(4, 2, 5), torch.randn(4, 2, 5)
    out, (h, c) = ours(torch.randn(0, 2, 3), (h0, c0))
    assert out.shape == (0, 2, 10)
    torch.testing.assert_close(h, h0)
    torch.testing.assert_close(c, c0)


# ----------------------------------------------------------------------------------- dropout
def _identity_probe_layer(ours: LSTM) -> None:
    """Turn layer 1 into a per-unit probe of its input: with w_hh = 0, forget gate closed (bias -1000),
    input and output gates at sigmoid(0) = 1/2 and g = x, each unit outputs 0.5 * tanh(0.5 * tanh(x_j)),
    zero exactly where the dropout zeroed x_j, and invertible elsewhere."""
    h = ours.hidden_size
    with torch.no_grad():
        w_ih = torch.zeros(4 * h, h, dtype=torch.float64)
        w_ih[2 * h:3 * h] = torch.eye(h, dtype=torch.float64)  # gate order i, f, g, o
        ours.weight_ih_l1.copy_(w_ih)
        ours.weight_hh_l1.zero_()
        ours.bias_ih_l1.zero_()
        ours.bias_ih_l1[h:2 * h] = -1000.0
        ours.bias_hh_l1.zero_()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_dropout_rate_and_scaling_between_layers_only(backend):
    p = 0.3
    torch.manual_seed(5)
    ours = LSTM(4, 16, num_layers=2, dropout=p, dtype=torch.float64)
    _identity_probe_layer(ours)
    layer0 = torch.nn.LSTM(4, 16, dtype=torch.float64)
    layer0.load_state_dict({k: v for k, v in ours.state_dict().items() if k.endswith("_l0")})
    x = torch.randn(50, 8, 4, dtype=torch.float64)
    with torch.no_grad(), bigkernels.use_backend(backend):
        first = layer0(x)[0]
        out, (h_n, _) = ours.train()(x)
        out_eval = ours.eval()(x)[0]
    # Invert the probe to recover layer 1's input: layer 0's output, dropped and rescaled.
    dropped_input = torch.atanh(2 * torch.atanh(2 * out))
    ratio = dropped_input / first
    kept = ratio != 0
    assert ratio[~kept].numel() > 0
    torch.testing.assert_close(ratio[kept], torch.full_like(ratio[kept], 1 / (1 - p)))  # scaled by 1/(1-p)
    rate = 1 - kept.double().mean().item()
    sigma = (p * (1 - p) / ratio.numel()) ** 0.5
    assert abs(rate - p) < 5 * sigma, f"drop rate {rate:.4f}, expected {p} (+-{5 * sigma:.4f})"
    # No dropout after the last layer: h_n is the last step of the output as is.
    torch.testing.assert_close(h_n[1], out[-1])
    # Eval ignores dropout: the probe sees layer 0's output itself.
    torch.testing.assert_close(torch.atanh(2 * torch.atanh(2 * out_eval)), first)


def test_dropout_reproducible_under_a_seed_and_same_mask_as_stock():
    """Dropout draws from the global generator exactly as stock nn.LSTM on the CPU (one F.dropout per
    inner layer output, in order), so a seed reproduces ours and gives stock's masks."""
    cfg = Config(num_layers=3, bidirectional=True, training=True, form="packed_unsorted")
    stock, _, ours = make_modules(cfg, "cpu", torch.float64, dropout=0.4)
    data = make_data(cfg)
    results = []
    for module, seed in ((ours, 7), (ours, 7), (stock, 7), (ours, 8)):
        torch.manual_seed(seed)
        results.append(run(module, cfg, data, torch.float64, "cpu"))
    (o1, g1, _), (o2, g2, _), (s, gs, _), (o3, _, _) = results
    for a, b in zip(o1, o2):
        assert torch.equal(a, b)
    for k in g1:
        assert torch.equal(g1[k], g2[k])
    for a, b in zip(o1, s):
        torch.testing.assert_close(a, b)
    for k in g1:
        torch.testing.assert_close(g1[k], gs[k])
    assert not torch.equal(o1[0], o3[0])  # another seed, other masks


def test_dropout_with_one_layer_warns_and_is_inert():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        ours = LSTM(3, 4, dropout=0.5)
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(ours.train()(x)[0], ours.eval()(x)[0])


# ------------------------------------------------------------------------------ torch.compile
class Tagger(torch.nn.Module):
    """A small sequence model: the LSTM and a linear head on every step (no embedding)."""

    def __init__(self, lstm: torch.nn.Module, classes: int = 3):
        super().__init__()
        self.lstm = lstm
        out = (lstm.proj_size or lstm.hidden_size) * (2 if lstm.bidirectional else 1)
        self.head = torch.nn.Linear(out, classes)

    def forward(self, x, hx):
        out, (h, c) = self.lstm(x, hx)
        return self.head(out).logsumexp(-1).sum() + h.square().sum() + c.sum()


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_compile_fullgraph_forward_backward(backend):
    # Stock nn.LSTM cannot do this: TorchDynamo refuses to trace torch.nn.LSTM instances ("Attempted
    # to wrap RNN, GRU, or LSTM", a graph break, so fullgraph=True fails) unless the user sets
    # torch._dynamo.config.allow_rnn. Ours derives from RNNBase and calls registered ops with fake
    # kernels, so the whole forward and backward trace as one graph.
    torch._dynamo.reset()
    device = "cpu" if backend == "cpu" else TRITON_DEVICE
    torch.manual_seed(9)
    model = Tagger(LSTM(3, 8, num_layers=2, bidirectional=True, proj_size=4, batch_first=True, device=device))
    model.train()
    x = torch.randn(2, 3, 3, device=device, requires_grad=True)
    hx = (torch.randn(4, 2, 4, device=device), torch.randn(4, 2, 8, device=device))
    # Inductor would generate C++ for the CPU under the Triton interpreter; aot_eager keeps the
    # graph and autograd checks without it.
    compiler = "aot_eager" if backend == "triton" and device == "cpu" else "inductor"
    with bigkernels.use_backend(backend):
        compiled = torch.compile(model, fullgraph=True, backend=compiler)
        loss_c = compiled(x, hx)
        grads_c = torch.autograd.grad(loss_c, [x, *model.parameters()])
        loss_e = model(x, hx)
        grads_e = torch.autograd.grad(loss_e, [x, *model.parameters()])
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------- bad input
def test_proj_size_must_be_below_hidden_size_at_construction():
    for proj in (6, 9):
        with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
            LSTM(4, 6, proj_size=proj)
    with pytest.raises(ValueError, match="proj_size should be a positive integer or zero"):
        LSTM(4, 6, proj_size=-1)


def test_unsorted_lengths_with_enforce_sorted_raise_like_torch():
    with pytest.raises(RuntimeError, match="must be sorted in decreasing order when `enforce_sorted` is True"):
        LSTM(3, 4)(pack_padded_sequence(torch.randn(4, 3, 3), torch.tensor([2, 4, 1]), enforce_sorted=True))


BAD_INPUTS = [
    ("input size", dict(x=torch.randn(5, 2, 4)), RuntimeError, "input.size\\(-1\\) must be equal to input_size. Expected 3, got 4"),
    ("input rank", dict(x=torch.randn(5, 2, 3, 1)), ValueError, "Expected input to be 2D or 3D, got 4D"),
    ("input dtype", dict(x=torch.randn(5, 2, 3, dtype=torch.float64)), ValueError, "input dtype \\(torch.float64\\) does not match weight dtype"),
    ("input type", dict(x=[[0.0] * 3] * 5), TypeError, "input must be a Tensor or a PackedSequence"),
    ("h_0 shape", dict(hx=(torch.randn(4, 2, 4), torch.randn(4, 2, 6))), RuntimeError, "hx\\[0\\] \\(h_0\\) must have shape \\(num_layers \\* num_directions, batch, proj_size or hidden_size\\)"),
    ("c_0 batch", dict(hx=(torch.randn(4, 2, 2), torch.randn(4, 3, 6))), RuntimeError, "Expected hidden\\[1\\] size \\(4, 2, 6\\), got \\[4, 3, 6\\]: hx\\[1\\] \\(c_0\\)"),
    ("state rank", dict(hx=(torch.randn(2, 2), torch.randn(4, 2, 6))), RuntimeError, "For batched 3-D input, hx and cx should also be 3-D"),
    ("unbatched state rank", dict(x=torch.randn(5, 3), hx=(torch.randn(4, 1, 2), torch.randn(4, 1, 6))), RuntimeError, "For unbatched 2-D input, hx and cx should also be 2-D"),
    ("state dtype", dict(hx=(torch.randn(4, 2, 2), torch.randn(4, 2, 6, dtype=torch.float64))), ValueError, "hx\\[1\\] \\(c_0\\) must have the input's dtype \\(torch.float32\\)"),
    ("state device", dict(hx=(torch.randn(4, 2, 2, device="meta"), torch.randn(4, 2, 6))), RuntimeError, "hx\\[0\\] \\(h_0\\) must be on the input's device"),
    ("hx not a pair", dict(hx=torch.randn(4, 2, 2)), ValueError, "hx must be a tuple \\(h_0, c_0\\)"),
    ("packed state batch", dict(x=pack_padded_sequence(torch.randn(5, 2, 3), [5, 3]), hx=(torch.randn(4, 3, 2), torch.randn(4, 3, 6))), RuntimeError, "Expected hidden\\[0\\] size \\(4, 2, 2\\)"),
]


@pytest.mark.parametrize("what, changes, error, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(what, changes, error, message):
    module = LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=2)
    args = dict(x=torch.randn(5, 2, 3), hx=None)
    args.update(changes)
    with pytest.raises(error, match=message):
        module(args["x"], args["hx"])


def test_autocast_cpu_runs_in_the_autocast_dtype_like_stock():
    """Stock nn.LSTM runs in bfloat16 under CPU autocast (oneDNN's RNN op is on the lower-precision
    list); ours does the same, and stays as accurate as stock there."""
    torch.manual_seed(5)
    stock = torch.nn.LSTM(6, 8, num_layers=2)
    ours = bigkernels.nn.LSTM(6, 8, num_layers=2)
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(4, 3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_s, (h_s, c_s) = stock(x)
        out_o, (h_o, c_o) = ours(x)
    assert out_o.dtype == out_s.dtype == torch.bfloat16
    assert h_o.dtype == h_s.dtype and c_o.dtype == c_s.dtype
    ref = torch.nn.LSTM(6, 8, num_layers=2).double()
    ref.load_state_dict(stock.state_dict())
    out_r, _ = ref(x.double())
    from numerics import assert_matches

    assert_matches("output", out_o, out_s, out_r)
