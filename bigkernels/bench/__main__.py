"""`python -m bigkernels.bench [options]`, the same as `bigkernels bench [options]`."""
from bigkernels.bench.cli import main

raise SystemExit(main())
