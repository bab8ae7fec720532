from exo_stable.cli import main

raise SystemExit(main())
