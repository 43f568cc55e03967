from bigkernels.cli import main

raise SystemExit(main())
