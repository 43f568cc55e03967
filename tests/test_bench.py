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
from bigkernels.bench import cli, lstm_cell, memory, runner, timing
from bigkernels.bench.cases import Case, Provider, Step
from bigkernels.bench.progress import ProgressBar
from bigkernels.bench.report import CSV_NAME, JSON_NAME, MARKDOWN_NAME, format_table

CPU_KERNELS = _backend.unavailable_reason("cpu", "lstm_cell", torch.device("cpu")) is None
TINY = timing.Budget(target_s=0.005, min_samples=2, warmup_s=0.001)
META = {"device_name": "test cpu", "torch_version": torch.__version__, "timestamp": "now"}


def lstm_case(mode="fwd", dtype=torch.float32, B=2, I=3, H=4) -> Case:
    return Case("lstm_cell", {"B": B, "I": I, "H": H}, dtype, mode, "cpu")


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
    assert len({c.id for c in full}) == len(full) == 5 * 3 * 2 * 2  # batch × hidden × dtype × mode
    assert {c.dtype for c in quick} == {torch.float32}
    assert {c.mode for c in quick} == set(registry.DEFAULT_MODES)


def test_gpu_cases_are_defined_without_a_gpu():
    full = registry.select_cases(device="cuda", full=True)
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
    with pytest.raises(ValueError, match="unknown op 'nope'; known ops: lstm_cell"):
        registry.get_op("nope")
    with pytest.raises(ValueError, match="unknown dtype"):
        registry.parse_dtype("fp8")
    assert registry.parse_dtype("bfloat16") is torch.bfloat16


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
