from hetero.cli import main

raise SystemExit(main())
