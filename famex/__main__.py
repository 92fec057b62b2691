from famex.cli import main

raise SystemExit(main())
