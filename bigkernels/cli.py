"""The `bigkernels` command: info, bench, tune, validate."""
from __future__ import annotations

import sys

USAGE = """usage: bigkernels <command> [options]

commands:
  info       versions, compiled backends, Triton, the device, each op's candidates, the tuning cache
             and which candidate won per key (--all: every entry)
  bench      run the benchmark suite (bigkernels bench --help)
  tune       pre-tune the benchmark grid's calls, so that later processes read the cache
             (bigkernels tune --help)
  validate   check every GPU kernel against the stock op on this GPU, in a child process, and record
             the verdicts in the tuning cache (bigkernels validate --help)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        from bigkernels._info import main as info_main

        return info_main(rest)
    if command in ("tune", "validate"):
        from bigkernels import _tune_cli

        return _tune_cli.tune_main(rest) if command == "tune" else _tune_cli.validate_main(rest)
    if command == "bench":
        from bigkernels.bench.cli import main as bench_main

        return bench_main(rest)
    print(f"bigkernels: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
