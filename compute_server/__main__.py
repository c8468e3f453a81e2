from contiguouskv.compute_server.server import main

raise SystemExit(main())
