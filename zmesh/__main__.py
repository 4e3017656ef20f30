from zmesh.cli import main

raise SystemExit(main())
