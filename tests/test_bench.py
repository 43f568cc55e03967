"""Tests of the benchmark harness (bigkernels/bench), not of speed: formulas, registry, schema of
the reports, a tiny end-to-end run, error handling. Timing budgets are cut to milliseconds and
torch.compile is left out of the end-to-end run, so the whole file takes a few seconds."""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json

import pytest
import torch

from bigkernels import _backend
from bigkernels.bench import cases as registry
from bigkernels.bench import cli, lstm, lstm_cell, memory, runner, timing
from bigkernels.bench.cases import Case, Provider, Step
from bigkernels.bench.progress import ProgressBar
from bigkernels.bench.report import CSV_NAME, JSON_NAME, MARKDOWN_NAME, format_table

CPU_KERNELS = _backend.unavailable_reason("cpu", "lstm_cell", torch.device("cpu")) is None
TINY = timing.Budget(target_s=0.005, min_samples=2, warmup_s=0.001)
META = {"device_name": "test cpu", "torch_version": torch.__version__, "timestamp": "now"}


def lstm_case(mode="fwd", dtype=torch.float32, B=2, I=3, H=4) -> Case:
    return Case("lstm_cell", {"B": B, "I": I, "H": H}, dtype, mode, "cpu")


def layer_case(mode="fwd", dtype=torch.float32, T=3, B=2, I=5, H=4, **extra) -> Case:
    """A case of the LSTM layer op (bigkernels.nn.LSTM); extra: L, D, P, ragged."""
    return Case("lstm", {"T": T, "B": B, "I": I, "H": H, **extra}, dtype, mode, "cpu")


# ------------------------------------------------------------------------------------ formulas
@pytest.mark.parametrize("mode, expected", [("fwd", 448), ("bwd", 896), ("fwd+bwd", 1344)])
def test_lstm_cell_flops_by_hand(mode, expected):
    # 2·B·4H·(I+H) = 2·2·16·7 = 448 forward; backward is two GEMMs of that size.
    assert lstm_cell.flops(lstm_case(mode)) == expected


@pytest.mark.parametrize(
    "mode, dtype, expected",
    [
        # forward elements: B·I 6 + 2BH 16 + 4H(I+H) 112 + 8H 32 + 2BH 16 = 182
        ("fwd", torch.float32, 182 * 4),
        # backward elements: 2BI 12 + 7BH 56 + 8H(I+H) 224 + 8H 32 = 324
        ("bwd", torch.float32, 324 * 4),
        ("fwd+bwd", torch.float32, (182 + 324) * 4),
        ("fwd+bwd", torch.bfloat16, (182 + 324) * 2),
    ],
)
def test_lstm_cell_bytes_by_hand(mode, dtype, expected):
    assert lstm_cell.bytes_moved(lstm_case(mode, dtype)) == expected


# ------------------------------------------------------------------------------------ registry
def test_quick_cpu_suite_is_a_subset_of_the_full_grid():
    quick = registry.select_cases(device="cpu")
    full = registry.select_cases(device="cpu", full=True)
    assert {c.id for c in quick} < {c.id for c in full}
    assert len({c.id for c in full}) == len(full)
    assert len([c for c in full if c.op == "lstm_cell"]) == 5 * 3 * 2 * 2  # batch × hidden × dtype × mode
    assert {c.dtype for c in quick} == {torch.float32}
    assert {c.mode for c in quick} == set(registry.DEFAULT_MODES)


def test_gpu_cases_are_defined_without_a_gpu():
    full = registry.select_cases(["lstm_cell"], device="cuda", full=True)
    assert {c.dtype for c in full} == {torch.bfloat16, torch.float16, torch.float32}
    assert {c.shape["B"] for c in full} == {1, 16, 64, 256, 1024}
    assert {c.shape["H"] for c in full} == {128, 512, 2048}


def test_shape_filter_and_case_identity():
    picked = registry.select_cases(["lstm_cell"], ["fwd"], device="cpu", shape_filter={"B": 16, "H": 128})
    assert [c.id for c in picked] == ["lstm_cell/fwd/cpu/fp32/B=16,I=128,H=128"]
    assert hash(picked[0]) == hash(lstm_case("fwd", B=16, I=128, H=128))


def test_inputs_are_seeded_per_case():
    a, b = lstm_cell.make_inputs(lstm_case()), lstm_cell.make_inputs(lstm_case())
    other = lstm_cell.make_inputs(lstm_case(B=3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["w_ih"], other["w_ih"])
    assert a["x"].abs().sum() > 0  # never benchmark on zeros


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown op 'nope'; known ops: lstm_cell, lstm"):
        registry.get_op("nope")
    with pytest.raises(ValueError, match="unknown dtype"):
        registry.parse_dtype("fp8")
    assert registry.parse_dtype("bfloat16") is torch.bfloat16


# ------------------------------------------------------------------------------------ LSTM layer op
@pytest.mark.parametrize(
    "extra, expected",
    [
        # 2·N·4H·(I+H) with N = T·B = 6: 2·6·16·9
        ({}, 1728),
        # projection P=2: gates 2·6·16·(5+2) = 1344, plus the projection 2·N·P·H = 96
        ({"P": 2}, 1440),
        # 2 bidirectional layers: layer 0 1728 per direction, layer 1 reads D·H = 8: 2·6·16·12 = 2304
        ({"L": 2, "D": 2}, 2 * (1728 + 2304)),
        # all three: layer 0 1440 per direction; layer 1 reads D·P = 4: 2·6·16·6 + 96 = 1248
        ({"L": 2, "D": 2, "P": 2}, 2 * (1440 + 1248)),
    ],
)
def test_lstm_forward_flops_by_hand(extra, expected):
    assert lstm.forward_flops(layer_case(**extra).shape) == expected


@pytest.mark.parametrize("mode, factor", [("fwd", 1), ("bwd", 2), ("fwd+bwd", 3)])
def test_lstm_flops_by_mode(mode, factor):
    assert lstm.flops(layer_case(mode)) == 1728 * factor


def test_lstm_ragged_batch_counts_the_steps_it_runs():
    assert lstm.ragged_lengths(4, 3) == [4, 3, 1]  # T down to T//4
    assert lstm.ragged_lengths(64, 1) == [64]
    lengths = lstm.ragged_lengths(64, 16)
    assert lengths[0] == 64 and lengths[-1] == 16 and lengths == sorted(lengths, reverse=True)
    # N = 4 + 3 + 1 = 8 steps instead of T·B = 12: 2·8·16·9
    assert lstm.forward_flops(layer_case(T=4, B=3, ragged=1).shape) == 2304


@pytest.mark.parametrize(
    "mode, dtype, extra, expected",
    [
        # forward elements: N(I+P) 6·9 = 54 + 2B(P+H) 4·8 = 32 + W = 4H(I+P) 144 + 8H 32 = 262
        ("fwd", torch.float32, {}, 262 * 4),
        # backward elements: 2N(I+P+H) 12·13 = 156 + 3B(P+H) 48 + 2W 288 + 8H 32 = 524
        ("bwd", torch.float32, {}, 524 * 4),
        ("fwd+bwd", torch.float32, {}, (262 + 524) * 4),
        ("fwd+bwd", torch.bfloat16, {}, (262 + 524) * 2),
        # P=2: N(I+P) 42 + 2B(P+H) 24 + W = 4H(I+P) 112 + P·H 8 + 8H 32 = 218
        ("fwd", torch.float32, {"P": 2}, 218 * 4),
        # 2 bidirectional layers: layer 0 as above (262) per direction; layer 1 reads I_l = D·H = 8:
        # N(I_l+P) 72 + 2B(P+H) 32 + W = 4H(8+4) 192 + 8H 32 = 328
        ("fwd", torch.float32, {"L": 2, "D": 2}, 2 * (262 + 328) * 4),
    ],
)
def test_lstm_bytes_by_hand(mode, dtype, extra, expected):
    assert lstm.bytes_moved(layer_case(mode, dtype, **extra)) == expected


def test_lstm_grids():
    quick = registry.select_cases(["lstm"], device="cpu")
    full = registry.select_cases(["lstm"], device="cpu", full=True)
    assert {c.id for c in quick} < {c.id for c in full} and len({c.id for c in full}) == len(full)
    # quick: one layer, one direction, fp32, both modes, I = H
    assert len(quick) == 2 * 3 * 3 * 2  # seq_len × batch × hidden × mode
    assert {c.dtype for c in quick} == {torch.float32} and {c.mode for c in quick} == set(registry.DEFAULT_MODES)
    assert all(set(c.shape) == {"T", "B", "I", "H"} and c.shape["I"] == c.shape["H"] for c in quick)
    assert {c.shape["T"] for c in quick} == {16, 64} and {c.shape["H"] for c in quick} == {128, 256, 512}
    # full: longer sequences, bf16, and each variant
    assert {c.shape["T"] for c in full} == {16, 64, 256, 512} and {c.dtype for c in full} == {torch.float32, torch.bfloat16}
    assert {c.shape["B"] for c in full} == {1, 8, 16, 64, 256} and {c.shape["H"] for c in full} == {128, 256, 512, 1024}
    for key, value in (("L", 2), ("D", 2), ("ragged", 1)):
        assert any(c.shape.get(key) == value for c in full), key
    assert {c.shape["P"] for c in full if "P" in c.shape} == {256 // 4, 512 // 4}
    gpu = registry.select_cases(["lstm"], device="cuda", full=True)
    assert {c.dtype for c in gpu} == {torch.bfloat16, torch.float16, torch.float32}
    assert {c.shape["T"] for c in gpu} == {128, 512, 1024} and {c.shape["B"] for c in gpu} == {1, 16, 64, 256}
    assert {c.shape["H"] for c in gpu} == {256, 1024, 2048}
    assert {c.dtype for c in registry.select_cases(["lstm"], device="cuda")} == {torch.bfloat16}


def test_lstm_shape_filter_knows_the_defaults():
    # Quick shapes leave L, D, P, ragged out; --shape L=1 must still find them.
    picked = registry.select_cases(["lstm"], ["fwd"], device="cpu", shape_filter={"T": 16, "B": 1, "H": 128, "L": 1})
    assert [c.id for c in picked] == ["lstm/fwd/cpu/fp32/T=16,B=1,I=128,H=128"]
    bidirectional = registry.select_cases(["lstm"], ["fwd"], [torch.float32], "cpu", True, {"D": 2})
    assert {c.shape_str for c in bidirectional} == {
        "T=64,B=16,I=256,H=256,D=2", "T=64,B=16,I=256,H=256,L=2,D=2",
        "T=256,B=64,I=512,H=512,D=2", "T=256,B=64,I=512,H=512,L=2,D=2",
    }


def test_lstm_inputs():
    case = layer_case("fwd+bwd", L=2, D=2, P=2)
    a, b = lstm.make_inputs(case), lstm.make_inputs(case)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["x"].shape == (3, 2, 5) and a["h0"].shape == (4, 2, 2) and a["c0"].shape == (4, 2, 4)
    assert a["grad_output"].shape == (3, 2, 4) and a["weight_hr_l1_reverse"].shape == (2, 4)
    assert all(a[name].requires_grad for name in ("x", "h0", "c0"))
    assert set(lstm.weight_names(case)) < set(a)

    ragged = lstm.make_inputs(layer_case("fwd+bwd", T=4, B=3, ragged=1))
    assert ragged["x"].shape == (8, 5) and ragged["grad_output"].shape == (8, 4)
    assert ragged["batch_sizes"].tolist() == [3, 2, 2, 1] and ragged["batch_sizes"].device.type == "cpu"
    assert sorted(ragged["sorted_indices"].tolist()) == [0, 1, 2]
    ref = registry.float64_copy(ragged, "cpu")
    assert ref["x"].dtype == torch.float64 and ref["x"].requires_grad
    assert ref["batch_sizes"] is ragged["batch_sizes"]  # integer tensors pass through


def test_lstm_providers():
    quick, _ = lstm.providers(layer_case(), False)
    names = [p.name for p in quick]
    assert names[-2:] == ["torch", "torch.compile"]
    assert ("bigkernels[cpu]+compile" in names) == CPU_KERNELS
    full, _ = lstm.providers(layer_case(), True)
    names = [p.name for p in full]
    assert "bigkernels[reference]" in names and "bigkernels[reference]+compile" not in names
    ragged, skipped = lstm.providers(layer_case(ragged=1), True)
    assert not any(p.name.endswith("+compile") for p in ragged)
    if CPU_KERNELS:
        assert "PackedSequence" in skipped["bigkernels[cpu]+compile"]


LAYER_PROVIDERS = ["torch", "bigkernels[reference]"] + (["bigkernels[cpu]"] if CPU_KERNELS else [])


@pytest.mark.parametrize(
    "mode, extra",
    [(mode, {}) for mode in registry.MODES]
    + [("fwd+bwd", {"L": 2, "D": 2, "P": 2}), ("fwd+bwd", {"T": 6, "B": 4, "ragged": 1}),
       ("fwd", {"T": 6, "B": 4, "L": 2, "D": 2, "ragged": 1})],
)
def test_lstm_error_column_is_small_for_correct_providers(mode, extra):
    # bigkernels[reference] composes bigkernels.reference.lstm_layer, the float64 reference is the
    # stock module: their agreement checks the reference, the packing and the weight loading.
    rows, _ = runner.run_case(layer_case(mode, **extra), True, TINY, META, LAYER_PROVIDERS)
    rows = {r.provider: r for r in rows}
    assert set(rows) == set(LAYER_PROVIDERS)
    for row in rows.values():
        assert row.status == "ok", row.error
        assert row.max_abs_err is not None and row.max_abs_err < 1e-4


@pytest.mark.skipif(not CPU_KERNELS, reason="bigkernels._C (CPU kernels) is not built")
def test_lstm_compiled_providers():
    # Stock nn.LSTM: Dynamo refuses it under fullgraph=True, which the row records; the bigkernels
    # module compiles. One Dynamo reset per case: both compiled providers keep their code.
    names = ["torch", "torch.compile", "bigkernels[cpu]+compile"]
    rows, _ = runner.run_case(layer_case("fwd+bwd"), False, TINY, META, names)
    rows = {r.provider: r for r in rows}
    assert rows["torch.compile"].status == "error" and "LSTM" in rows["torch.compile"].error
    assert rows["bigkernels[cpu]+compile"].status == "ok", rows["bigkernels[cpu]+compile"].error
    assert rows["bigkernels[cpu]+compile"].max_abs_err < 1e-4


def test_lstm_provider_not_implemented_gets_an_error_row(monkeypatch):
    # Until the C++ op lands the dispatcher raises NotImplementedError on the first call.
    def build(case, inputs):
        def call():
            raise NotImplementedError("Could not run 'bigkernels::lstm' with arguments from the 'CPU' backend.")

        return Step(call=call)

    base = lstm.BENCH

    def providers(case, full):
        runnable, skipped = base.providers(case, full)
        return [Provider("bigkernels[cpu]", build)] + [p for p in runnable if p.name == "torch"], skipped

    rows = _run_one(layer_case("fwd+bwd"), op=dataclasses.replace(base, providers=providers), monkeypatch=monkeypatch)
    assert rows["bigkernels[cpu]"].status == "error"
    assert rows["bigkernels[cpu]"].error.startswith("NotImplementedError: Could not run 'bigkernels::lstm'")
    assert rows["torch"].status == "ok" and rows["torch"].max_abs_err < 1e-5


def test_failures_at_many_shapes_are_one_line():
    def row(shape, provider, error=""):
        return runner.Row(
            case_id=f"x/fwd/cpu/fp32/{shape}", op="x", mode="fwd", device="cpu", dtype="fp32", shape=shape,
            provider=provider, status="error" if error else "ok", error=error, median_ms=None if error else 1.0,
            p20_ms=None, p80_ms=None, samples=None, timing_method="", flops=1, bytes=1, gflop_per_s=None,
            gb_per_s=None, speedup_vs_torch=None, max_abs_err=None, peak_mem_mib=None, peak_mem_method="",
        )

    rows = [row(s, "torch") for s in ("B=1", "B=2", "B=3")]
    rows += [row(s, "torch.compile", "Unsupported: LSTM") for s in ("B=1", "B=2", "B=3")]
    rows += [row(s, "bad", "boom") for s in ("B=1", "B=3")] + [row("B=2", "odd", "once")]
    table = format_table(runner.RunResult(rows=rows))
    assert "FAILED torch.compile @ all 3 shapes: Unsupported: LSTM" in table
    assert "FAILED bad @ 2 shapes (B=1 ... B=3): boom" in table
    assert "FAILED odd @ B=2: once" in table


# ------------------------------------------------------------------------------------ measuring
def test_interleaved_timing_quantiles_are_ordered():
    x = torch.randn(64, 64)
    steps = {"a": Step(call=lambda: (x @ x,)), "b": Step(call=lambda: (x + x,))}
    timings, errors = timing.time_steps(steps, "cpu", TINY)
    assert errors == {}
    for t in timings.values():
        assert t.samples >= TINY.min_samples
        assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms


def test_timing_records_a_provider_that_raises():
    def boom():
        raise RuntimeError("kernel exploded")

    timings, errors = timing.time_steps({"ok": Step(call=lambda: ()), "bad": Step(call=boom)}, "cpu", TINY)
    assert set(timings) == {"ok"} and "kernel exploded" in errors["bad"]


def test_cpu_peak_memory_sees_an_allocation():
    peak, method = memory.peak_mib(lambda: torch.empty(4 * 2**20, dtype=torch.uint8).fill_(1), "cpu")
    assert method in (memory.CPU_PROFILER_METHOD, memory.RSS_METHOD)
    assert peak is not None
    if method == memory.CPU_PROFILER_METHOD:  # exact; the RSS fallback may see reused pages as 0
        assert peak >= 4


# ------------------------------------------------------------------------------------ runner
def _run_one(case: Case, only=None, op=None, monkeypatch=None):
    if op is not None:
        monkeypatch.setattr(runner, "get_op", lambda name: op)
    rows, _ = runner.run_case(case, False, TINY, META, only)
    return {r.provider: r for r in rows}


@pytest.mark.parametrize("mode", registry.MODES)
def test_error_column_is_small_for_correct_providers(mode):
    rows = _run_one(lstm_case(mode, B=5, I=7, H=9), only=["torch", "bigkernels[cpu]"])
    assert "torch" in rows
    for row in rows.values():
        assert row.status == "ok", row.error
        assert row.max_abs_err is not None and row.max_abs_err < 1e-4
    assert rows["torch"].speedup_vs_torch == 1.0


def _with_extra_provider(provider: Provider) -> registry.OpBench:
    base = lstm_cell.BENCH

    def providers(case, full):
        runnable, skipped = base.providers(case, full)
        return [p for p in runnable if p.name == "torch"] + [provider], skipped

    return dataclasses.replace(base, providers=providers)


def test_error_column_catches_a_wrong_gradient(monkeypatch):
    torch_provider = next(p for p in lstm_cell.BENCH.providers(lstm_case(), False)[0] if p.name == "torch")

    def build(case, inputs):
        step = torch_provider.build(case, inputs)
        return Step(call=lambda: tuple(t * 1.01 if i == 4 else t for i, t in enumerate(step.call())))

    rows = _run_one(lstm_case("fwd+bwd"), op=_with_extra_provider(Provider("off-by-1%", build)), monkeypatch=monkeypatch)
    assert rows["torch"].max_abs_err < 1e-5
    assert rows["off-by-1%"].max_abs_err > 1e-4


def test_a_failing_provider_gets_an_error_row_and_the_run_goes_on(monkeypatch):
    def build(case, inputs):
        raise RuntimeError("torch.compile: backend compiler failed\nlong traceback ...")

    rows = _run_one(lstm_case(), op=_with_extra_provider(Provider("broken", build)), monkeypatch=monkeypatch)
    assert rows["broken"].status == "error"
    assert rows["broken"].error == "RuntimeError: torch.compile: backend compiler failed"
    assert rows["broken"].median_ms is None and rows["broken"].speedup_vs_torch is None
    assert rows["torch"].status == "ok"
    assert "FAILED broken" in format_table(runner.RunResult(rows=list(rows.values())))


def test_progress_bar_writes_a_line_per_case_to_a_log():
    stream = io.StringIO()
    bar = ProgressBar(stream)
    case = lstm_case()
    bar(0, 2, case, "reference")
    bar(0, 2, case, "timing")  # same case: no new line in a log
    bar(2, 2, case, "done")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "1/2" in lines[0] and lines[1].startswith("[" + "#" * 24 + "]")


# ------------------------------------------------------------------------------------ CLI end to end
@pytest.mark.skipif(not CPU_KERNELS, reason="bigkernels._C (CPU kernels) is not built")
def test_tiny_end_to_end_run(tmp_path, capsys):
    providers = ["bigkernels[cpu]", "torch"]
    argv = ["--op", "lstm_cell", "--shape", "B=16,H=128", "--provider", ",".join(providers),
            "--target-time", "0.005", "--min-samples", "2", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "lstm_cell  fwd  cpu  fp32" in out and "lstm_cell  fwd+bwd  cpu  fp32" in out
    assert "bigkernels[cpu]" in out and "×1.00" in out  # torch against itself

    with open(tmp_path / CSV_NAME) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == runner.COLUMNS
        rows = list(reader)
    # one row per case × provider: 2 modes × 1 shape × 2 providers
    assert sorted((r["case_id"], r["provider"]) for r in rows) == sorted(
        (f"lstm_cell/{mode}/cpu/fp32/B=16,I=128,H=128", p) for mode in registry.DEFAULT_MODES for p in providers
    )
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert float(r["median_ms"]) > 0 and float(r["gflop_per_s"]) > 0 and float(r["gb_per_s"]) > 0
        assert float(r["max_abs_err"]) < 1e-4
        assert r["torch_version"] == torch.__version__ and r["timestamp"] and r["device_name"]

    data = json.loads((tmp_path / JSON_NAME).read_text())
    assert len(data["rows"]) == len(rows) and set(data["rows"][0]) == set(runner.COLUMNS)
    for key in ("command", "wall_s", "device_name", "torch_version", "skipped_providers", "busy_cores_before"):
        assert key in data["metadata"]

    markdown = (tmp_path / MARKDOWN_NAME).read_text()
    assert "### lstm_cell · fwd · cpu · fp32" in markdown and "| B=16,I=128,H=128 |" in markdown
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "lstm_cell_fwd_cpu_fp32.png").stat().st_size > 0
        assert (tmp_path / "lstm_cell_fwd-bwd_cpu_fp32.png").stat().st_size > 0


def test_cli_unknown_op_is_a_clear_error(capsys):
    assert cli.main(["--op", "nope", "--list"]) == 2
    err = capsys.readouterr().err
    assert "unknown op 'nope'" in err and "known ops: lstm_cell" in err


def test_cli_rejects_bad_values(capsys):
    assert cli.main(["--mode", "sideways", "--list"]) == 2
    assert cli.main(["--dtype", "fp8", "--list"]) == 2
    assert cli.main(["--provider", "numpy", "--list"]) == 2
    assert cli.main(["--shape", "B=x", "--list"]) == 2
    err = capsys.readouterr().err
    assert "unknown mode 'sideways'" in err and "unknown dtype 'fp8'" in err and "unknown provider 'numpy'" in err


def test_cli_list_runs_nothing(capsys):
    assert cli.main(["--list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "lstm_cell/fwd/cpu/fp32/B=1,I=128,H=128" in out and "torch.compile" in out
    assert out.rstrip().endswith(f"{len(registry.select_cases(device='cpu'))} cases")


def test_attention_peers_are_skipped_with_a_note_when_they_cannot_run():
    """Peers (flash-attn, xformers) join a case only when installed and able to run it; otherwise
    the case lists each with its reason, and never errors."""
    from bigkernels.bench import attention

    case = Case("attention", {"B": 1, "H": 2, "L": 16, "D": 8, "causal": 0}, torch.float32, "fwd", "cpu")
    providers, skipped = attention.providers(case, full=False)
    names = [p.name for p in providers]
    for peer in attention.PEERS:
        assert peer not in names
        assert skipped[peer]  # "... is not installed" or "runs on CUDA tensors only"
