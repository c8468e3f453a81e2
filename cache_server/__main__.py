"""``python -m contiguouskv.cache_server``: run one cache server (see ``server.main``)."""

from contiguouskv.cache_server.server import main

raise SystemExit(main())
