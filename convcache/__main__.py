from convcache.cli import main

raise SystemExit(main())
