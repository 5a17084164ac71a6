from avl_compile.bench.cli import main

raise SystemExit(main())
