"""Benchmarks of bigkernels' ops against stock torch: `bigkernels bench` (bench/cli.py).

  cases.py      the case registry: Case, Provider, Step, OpBench; which op files exist
  <op>.py       one op's shapes, FLOP/byte formulas, inputs, float64 reference, providers
  providers.py  bigkernels[<backend>], torch eager, torch.compile for ops with a drop-in module
  timing.py     interleaved timing: perf_counter on CPU, triton do_bench or CUDA events on GPU
  memory.py     peak memory of one call
  runner.py     cases -> rows (one per case × provider)
  report.py     terminal table, CSV, JSON, markdown;  plots.py  PNG plots
The pytest-benchmark suite in benchmarks/ runs the same cases.
"""
