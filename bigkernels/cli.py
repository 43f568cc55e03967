"""The `bigkernels` command: `bigkernels info` and `bigkernels bench ...`."""
from __future__ import annotations

import sys

USAGE = """usage: bigkernels <command> [options]

commands:
  info     versions, compiled backends, Triton, the device, and the backend each op uses
  bench    run the benchmark suite (bigkernels bench --help)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        from bigkernels._info import main as info_main

        return info_main()
    if command == "bench":
        from bigkernels.bench.cli import main as bench_main

        return bench_main(rest)
    print(f"bigkernels: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
