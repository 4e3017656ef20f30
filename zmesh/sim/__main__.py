from zmesh.sim.cli import main

raise SystemExit(main())
