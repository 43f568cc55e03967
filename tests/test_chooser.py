"""The measured chooser (bigkernels/_chooser.py) and its cache (bigkernels/_tune_cache.py).

Injected candidates (a fast one, a slow one, a wrong one, a raising one) show the choice logic, the
GPU-style validation and the cache without depending on this machine's timings; the real ops show
that every op's candidates run, and that the chooser composes with autograd and torch.compile.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

import bigkernels
from bigkernels import _chooser, _tune_cache
from bigkernels._chooser import Candidate, Chooser, size_bucket
from bigkernels.nn.functional import lstm_cell, lstm_layer, scaled_dot_product_attention
from numerics import assert_matches

CPU_KERNELS = bigkernels._extension.AVAILABLE


@pytest.fixture
def tuned(tmp_path, monkeypatch):
    """Tuning on, a fresh cache directory, no memory of earlier choices; the cache dir is returned."""
    monkeypatch.setenv("BIGKERNELS_CACHE_DIR", str(tmp_path))
    _chooser.forget()
    _tune_cache._warned.clear()
    with bigkernels.tuning(True):
        yield tmp_path
    _chooser.forget()


def _sleepy(seconds: float, scale: float = 2.0, calls: list | None = None, name: str = ""):
    def run(x, w):
        if calls is not None:
            calls.append(name)
        time.sleep(seconds)
        return x * w * scale / 2.0

    return run


def _raising(x, w):
    raise RuntimeError("kernel exploded")


def _toy_chooser(op: str, candidates: list[Candidate]) -> Chooser:
    return Chooser(op, candidates, signature=lambda x, w: (x.shape, x.dtype, w.shape))


def _args(grad: bool = False):
    x = torch.randn(7, 5, requires_grad=grad)
    w = torch.randn(7, 5, requires_grad=grad)
    return x, w


@pytest.mark.parametrize("grad", [False, True])
def test_fastest_candidate_wins_and_is_cached(tuned, grad):
    calls: list[str] = []
    chooser = _toy_chooser(f"toy_fastest_{grad}", [
        Candidate("ours.slow", "cpu", _sleepy(0.004, calls=calls, name="ours.slow")),
        Candidate("ours.fast", "cpu", _sleepy(0.0, calls=calls, name="ours.fast")),
        Candidate("stock", "stock", _sleepy(0.002, calls=calls, name="stock")),
    ])
    args = _args(grad)
    assert chooser.pick(torch.device("cpu"), args, grad).name == "ours.fast"
    assert set(calls) == {"ours.slow", "ours.fast", "stock"}  # each one timed
    entry = next(e for k, e in _chooser.entries().items() if k.startswith(chooser.op))
    assert entry["choice"] == "ours.fast" and entry["how"] == "measured"
    assert set(entry["ms"]) == {"ours.slow", "ours.fast", "stock"}
    assert entry["ms"]["ours.slow"] > entry["ms"]["ours.fast"]
    calls.clear()
    assert chooser.pick(torch.device("cpu"), args, grad).name == "ours.fast"
    assert calls == []  # remembered: nothing timed again
    # A new process (fresh memory) reads the file: no re-tuning.
    _chooser.forget()
    assert chooser.pick(torch.device("cpu"), args, grad).name == "ours.fast"
    assert calls == []
    assert _tune_cache.cache_path().exists()


def test_stock_wins_where_it_is_fastest(tuned):
    chooser = _toy_chooser("toy_stock_wins", [
        Candidate("ours", "cpu", _sleepy(0.003)),
        Candidate("stock", "stock", _sleepy(0.0)),
    ])
    assert chooser.pick(torch.device("cpu"), _args(), False).name == "stock"


def test_raising_candidate_is_dropped_with_one_warning(tuned):
    chooser = _toy_chooser("toy_raising", [
        Candidate("ours.broken", "cpu", _raising),
        Candidate("stock", "stock", _sleepy(0.0)),
    ])
    with pytest.warns(RuntimeWarning, match="ours.broken.*kernel exploded"):
        assert chooser.pick(torch.device("cpu"), _args(), False).name == "stock"
    entry = next(e for k, e in _chooser.entries().items() if k.startswith("toy_raising"))
    assert "kernel exploded" in entry["rejected"]["ours.broken"]


@pytest.mark.parametrize("tuning_on", [True, False])
@pytest.mark.parametrize("grad", [False, True])
def test_validation_disables_a_wrong_kernel(tuned, tuning_on, grad):
    """A kernel that must be validated (as GPU kernels are) and computes the wrong thing is never
    trusted: it is disabled for the key with one warning and the stock op runs, tuning on or off."""
    chooser = _toy_chooser(f"toy_wrong_{tuning_on}_{grad}", [
        Candidate("gpu.wrong", "cpu", _sleepy(0.0, scale=2.001), validate=True),  # off by 1e-3
        Candidate("stock", "stock", _sleepy(0.002)),
    ])
    with bigkernels.tuning(tuning_on), pytest.warns(RuntimeWarning, match="gpu.wrong.*disabled"):
        assert chooser.pick(torch.device("cpu"), _args(grad), grad).name == "stock"
    entry = next(e for k, e in _chooser.entries().items() if k.startswith(chooser.op))
    assert "error" in entry["rejected"]["gpu.wrong"] and entry["validated"] == []


def test_validation_trusts_a_correct_kernel(tuned):
    chooser = _toy_chooser("toy_right", [
        Candidate("gpu.right", "cpu", lambda x, w: (x.double() * w.double()).float(), validate=True),
        Candidate("stock", "stock", _sleepy(0.003)),
    ])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert chooser.pick(torch.device("cpu"), _args(True), True).name == "gpu.right"
    entry = next(e for k, e in _chooser.entries().items() if k.startswith("toy_right"))
    assert entry["validated"] == ["gpu.right"] and entry["rejected"] == {}


def test_raising_kernel_fails_validation(tuned):
    chooser = _toy_chooser("toy_raising_gpu", [
        Candidate("gpu.broken", "cpu", _raising, validate=True),
        Candidate("stock", "stock", _sleepy(0.0)),
    ])
    with pytest.warns(RuntimeWarning, match="gpu.broken.*kernel exploded"):
        assert chooser.pick(torch.device("cpu"), _args(), False).name == "stock"


def test_tuning_off_deterministic_and_forced_backends_take_the_heuristic(tuned):
    calls: list[str] = []
    chooser = _toy_chooser("toy_heuristic", [
        Candidate("ours", "cpu", _sleepy(0.003, calls=calls, name="ours")),
        Candidate("stock", "stock", _sleepy(0.0, calls=calls, name="stock")),
    ])
    with bigkernels.tuning(False):
        assert chooser.pick(torch.device("cpu"), _args(), False).name == "ours"
    torch.use_deterministic_algorithms(True)
    try:
        assert chooser.pick(torch.device("cpu"), _args(), False).name == "ours"
    finally:
        torch.use_deterministic_algorithms(False)
    with bigkernels.use_backend("cpu"):
        assert chooser.pick(torch.device("cpu"), _args(), False).name == "ours"
    assert calls == []  # nothing was timed
    assert not _chooser.entries()


def test_huge_calls_keep_the_heuristic(tuned, monkeypatch):
    monkeypatch.setattr(_chooser, "TUNE_MAX_CALL_S", 0.001)
    calls: list[str] = []
    chooser = _toy_chooser("toy_huge", [
        Candidate("ours", "cpu", _sleepy(0.005, calls=calls, name="ours")),
        Candidate("stock", "stock", _sleepy(0.0, calls=calls, name="stock")),
    ])
    assert chooser.pick(torch.device("cpu"), _args(), False).name == "ours"
    assert calls == ["ours"]  # one call, then the heuristic stays
    entry = next(e for k, e in _chooser.entries().items() if k.startswith("toy_huge"))
    assert entry["how"].startswith("heuristic (one call takes")


def test_key_names_device_threads_grad_and_candidates(tuned):
    chooser = _toy_chooser("toy_key", [Candidate("ours", "cpu", _sleepy(0.0)), Candidate("stock", "stock", _sleepy(0.0))])
    key = chooser.key(torch.device("cpu"), _args(), True, chooser.candidates)
    assert key.startswith("toy_key|ours,stock|") and "|grad|" in key
    assert f"threads={torch.get_num_threads()}" in key and key.endswith("|cpu")


def test_size_bucket():
    assert [size_bucket(n) for n in (0, 1, 7, 8, 9, 12, 13, 16, 17, 24, 25, 33, 64, 65, 100, 1000)] == \
        [0, 1, 7, 8, 12, 12, 16, 16, 24, 24, 32, 48, 64, 96, 128, 1024]


# ------------------------------------------------------------------------------------ the cache file
def _toy_call(op="toy_cache"):
    chooser = _toy_chooser(op, [Candidate("ours", "cpu", _sleepy(0.0)), Candidate("stock", "stock", _sleepy(0.001))])
    return chooser.pick(torch.device("cpu"), _args(), False).name


def test_corrupt_cache_is_ignored_with_one_warning_and_rewritten(tuned):
    path = _tune_cache.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{ this is not json")
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert _toy_call() == "ours"
    data = json.loads(path.read_text())
    assert any(k.startswith("toy_cache") for k in data["entries"])


def test_foreign_cache_is_ignored(tuned):
    path = _tune_cache.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    foreign = dict(_tune_cache.fingerprint(), cpu="Some Other CPU 9000")
    key = "toy_cache|ours,stock|x"
    path.write_text(json.dumps({"format": 1, "machine": foreign, "entries": {key: {"choice": "stock"}}}))
    with pytest.warns(RuntimeWarning, match="another machine"):
        assert _toy_call() == "ours"  # re-tuned here, not read from the other CPU's file
    data = json.loads(path.read_text())
    assert data["machine"] == _tune_cache.fingerprint() and key not in data["entries"]


def test_cache_file_is_named_by_the_machine(tuned):
    here = _tune_cache.cache_path()
    other = _tune_cache.cache_path(dict(_tune_cache.fingerprint(), cpu="AMD EPYC 9654 96-Core Processor"))
    newer_torch = _tune_cache.cache_path(dict(_tune_cache.fingerprint(), torch="9.9.9"))
    assert len({here, other, newer_torch}) == 3
    assert "amd-epyc-9654" in other.name


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_cache_dir_warns_once_and_the_call_runs(tuned, monkeypatch):
    locked = tuned / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    monkeypatch.setenv("BIGKERNELS_CACHE_DIR", str(locked / "cache"))
    with pytest.warns(RuntimeWarning, match="cannot write"):
        assert _toy_call("toy_unwritable") == "ours"


def test_cache_path_that_is_a_file_warns_and_the_call_runs(tuned, monkeypatch):
    blocker = tuned / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("BIGKERNELS_CACHE_DIR", str(blocker))
    with pytest.warns(RuntimeWarning, match="cannot write"):
        assert _toy_call("toy_file") == "ours"


_WORKER = """
import sys, time, torch, bigkernels
from bigkernels._chooser import Candidate, Chooser
def run(x, w):
    return x * w
for i in range(int(sys.argv[2])):
    op = f"toy_{sys.argv[1]}_{i}"
    c = Chooser(op, [Candidate("ours", "cpu", run), Candidate("stock", "stock", run)], lambda x, w: (x.shape,))
    c.pick(torch.device("cpu"), (torch.randn(3), torch.randn(3)), False)
"""


def test_two_processes_tuning_at_once_leave_a_valid_cache(tuned):
    env = dict(os.environ, BIGKERNELS_TUNE="on", BIGKERNELS_CACHE_DIR=str(tuned))
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, name, "25"], env=env) for name in ("a", "b")]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    data = json.loads(_tune_cache.cache_path().read_text())
    keys = data["entries"]
    assert sum(k.startswith("toy_a_") for k in keys) == 25 and sum(k.startswith("toy_b_") for k in keys) == 25


def test_bogus_tune_setting_warns_and_calls_still_run():
    code = ("import torch, bigkernels; from bigkernels.nn.functional import lstm_cell; "
            "x = torch.randn(2, 3); print(lstm_cell(x, None, torch.randn(8, 3), torch.randn(8, 2))[0].shape)")
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, BIGKERNELS_TUNE="bogus"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "BIGKERNELS_TUNE must be 'on' or 'off', got 'bogus'" in done.stderr
    assert "torch.Size([2, 2])" in done.stdout


def test_tuning_rejects_a_non_bool():
    with pytest.raises(TypeError, match="tuning\\(enabled\\) takes a bool"):
        with bigkernels.tuning("on"):
            pass


# ------------------------------------------------------------------------------------ real ops
@pytest.mark.skipif(not CPU_KERNELS, reason="needs the compiled CPU kernels")
@pytest.mark.parametrize("grad", [False, True])
def test_lstm_layer_races_both_paths_and_stock(tuned, grad):
    x = torch.randn(6, 3, 16, requires_grad=grad)
    h0, c0 = torch.randn(3, 32), torch.randn(3, 32)
    w_ih, w_hh = torch.randn(128, 16, requires_grad=grad), torch.randn(128, 32, requires_grad=grad)
    b_ih, b_hh = torch.randn(128), torch.randn(128)
    out, h, c = lstm_layer(x, None, h0, c0, w_ih, w_hh, b_ih, b_hh)
    key, entry = next((k, e) for k, e in _chooser.entries().items() if k.startswith("lstm|"))
    onednn = {"cpu.fused.onednn", "cpu.generic.onednn"} if torch.backends.mkldnn.is_available() else set()
    assert set(entry["ms"]) == {"cpu.fused", "cpu.generic", "stock"} | onednn, entry
    assert entry["choice"] in entry["ms"] and _chooser.last_choice["lstm"] == entry["choice"]
    assert ("|grad|" in key) == grad
    with bigkernels.use_backend("reference"):
        ref = lstm_layer(*(t.double() for t in (x, )), None, h0.double(), c0.double(), w_ih.double(), w_hh.double(),
                         b_ih.double(), b_hh.double())
    from bigkernels.ops import lstm as lstm_op

    with torch.no_grad():
        stock = lstm_op.CHOOSER.by_name["stock"].run(x, None, h0, c0, w_ih, w_hh, b_ih, b_hh, None, False)
    for name, o, s, r in zip(("output", "h_n", "c_n"), (out, h, c), stock, ref):
        assert_matches(name, o, s, r)


@pytest.mark.skipif(not CPU_KERNELS, reason="needs the compiled CPU kernels")
def test_stock_candidates_match_the_reference(tuned):
    """Each op's stock candidate computes the op (it may be chosen): checked against float64."""
    from bigkernels.ops import attention, conv, lstm, lstm_cell as cell_op

    x, h0, c0 = torch.randn(5, 2, 4), torch.randn(2, 6), torch.randn(2, 6)
    w = (torch.randn(24, 4), torch.randn(24, 6), torch.randn(24), torch.randn(24))
    for reverse in (False, True):
        got = lstm.CHOOSER.by_name["stock"].run(x, None, h0, c0, *w, None, reverse)
        ref = lstm.CHOOSER.by_name["reference"].run(*(t.double() for t in (x,)), None, h0.double(), c0.double(),
                                                    *(t.double() for t in w), None, reverse)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5)
    q, k, v = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    for right in (-1, 0):
        call = (q, k, v, None, None, None, 0, 0, 0.3, -1, right, 0.0, False)
        got = attention.CHOOSER.by_name["stock"].run(*call)[0]
        ref = attention.CHOOSER.by_name["reference"].run(*(t.double() for t in (q, k, v)), *call[3:])[0]
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    xi, wc, res = torch.randn(2, 4, 7, 7), torch.randn(6, 4, 3, 3), torch.randn(2, 6, 7, 7)
    call = (xi, wc, None, res, [1, 1], [1, 1], [1, 1], 1, "silu", 0.01)
    torch.testing.assert_close(conv.CHOOSER.by_name["stock"].run(*call), conv.CHOOSER.by_name["cpu"].run(*call),
                               atol=1e-5, rtol=1e-5)
    args = (torch.randn(3, 4), torch.randn(3, 6), torch.randn(3, 6), torch.randn(24, 4), torch.randn(24, 6), None, None)
    for g, r in zip(cell_op.CHOOSER.by_name["stock"].run(*args), cell_op.CHOOSER.by_name["cpu"].run(*args)):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not CPU_KERNELS, reason="needs the compiled CPU kernels")
def test_every_op_tunes_on_the_cpu(tuned):
    x = torch.randn(4, 8)
    lstm_cell(x, None, torch.randn(64, 8), torch.randn(64, 16))
    q = torch.randn(1, 2, 16, 8)
    scaled_dot_product_attention(q, q, q, is_causal=True)
    bigkernels.nn.functional.conv2d(torch.randn(1, 8, 9, 9), torch.randn(8, 8, 1, 1), activation="relu")
    bigkernels.nn.functional.conv2d(torch.randn(1, 8, 9, 9), torch.randn(8, 1, 3, 3), padding=1, groups=8)
    ops = {k.split("|")[0] for k, e in _chooser.entries().items() if e["how"] == "measured"}
    assert {"lstm_cell", "attention", "conv"} <= ops
    conv_entries = [e for k, e in _chooser.entries().items() if k.startswith("conv|")]
    assert any("cpu.depthwise" in e["ms"] for e in conv_entries)


@pytest.mark.skipif(not CPU_KERNELS, reason="needs the compiled CPU kernels")
def test_compile_reads_the_choice_at_trace_time_and_never_times(tuned, monkeypatch):
    model = bigkernels.nn.LSTMCell(8, 16)
    x = torch.randn(4, 8)
    with torch.no_grad():
        eager = model(x)  # tunes this key
    timed: list[str] = []
    real = _chooser._time_once
    monkeypatch.setattr(_chooser, "_time_once", lambda c, *a, **k: timed.append(c.name) or real(c, *a, **k))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        out = compiled(x)
        other = compiled(torch.randn(5, 8))  # an untuned shape traced: heuristic, still not timed
    assert timed == []
    torch.testing.assert_close(out, eager)
    assert other[0].shape == (5, 16)


@pytest.mark.triton
def test_triton_kernel_validated_under_the_interpreter(tuned):
    """The real Triton LSTM cell kernel through the validation path (as on a GPU), under the
    interpreter: it matches the stock op, so it is trusted."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernel under the interpreter (CPU)")
    from bigkernels.ops import lstm_cell as cell_op

    triton = cell_op.CHOOSER.by_name["triton"]
    chooser = Chooser("toy_triton_cell", [
        Candidate("triton", "cpu", triton.run, validate=True),  # "cpu" so that it is eligible on CPU tensors
        Candidate("stock", "stock", cell_op.CHOOSER.by_name["stock"].run),
    ], signature=lambda *a: tuple(t.shape for t in a if t is not None))
    args = (torch.randn(3, 8), torch.randn(3, 16), torch.randn(3, 16), torch.randn(64, 8), torch.randn(64, 16),
            torch.randn(64), torch.randn(64))
    with bigkernels.tuning(False):
        assert chooser.pick(torch.device("cpu"), args, False).name == "triton"
    entry = next(e for k, e in _chooser.entries().items() if k.startswith("toy_triton_cell"))
    assert entry["validated"] == ["triton"], entry


def test_compiled_code_runs_the_cached_choice(tuned):
    """A static trace bakes in the cached winner (here the stock candidate, slower ours); a trace
    with symbolic sizes cannot look one up and takes the heuristic (ours)."""
    chooser = _toy_chooser("toy_compiled", [
        Candidate("ours", "cpu", lambda x, w: x * w * 2),
        Candidate("stock", "stock", lambda x, w: x * w * 3),
    ])
    x, w = torch.ones(4, 5), torch.ones(4, 5)
    key = chooser.key(torch.device("cpu"), (x, w), False, chooser.candidates)
    _chooser._entries[key] = {"choice": "stock", "how": "measured"}

    def f(x, w):
        return chooser.pick(x.device, (x, w), False).run(x, w)

    torch._dynamo.reset()
    assert torch.compile(f, fullgraph=True, dynamic=False)(x, w)[0, 0].item() == 3.0
    torch._dynamo.reset()
    assert torch.compile(f, fullgraph=True, dynamic=True)(x, w)[0, 0].item() == 2.0


def test_read_only_home_warns_once_and_calls_still_run():
    """HOME where nothing can be created (as for a service account): one warning, the calls run,
    the choices stay in memory."""
    code = ("import warnings, torch, bigkernels\n"
            "from bigkernels._chooser import Candidate, Chooser\n"
            "c = Chooser('toy_home', [Candidate('ours', 'cpu', lambda x: x + 1), Candidate('stock', 'stock', lambda x: x + 1)],"
            " lambda x: (x.shape,))\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    for n in (3, 4, 5):\n"
            "        c.pick(torch.device('cpu'), (torch.randn(n),), False).run(torch.randn(n))\n"
            "print(sum('cannot write' in str(w.message) for w in caught))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("BIGKERNELS_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(HOME="/proc/self/no-such-home", BIGKERNELS_TUNE="on")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"  # one warning for three tuned keys
