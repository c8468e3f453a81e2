from contiguouskv.cli import main

raise SystemExit(main())
