"""The compute server: runs Re-Prefill layer by layer over prefix KV streamed from the cache server.

Folders (map and request path: docs/architecture.md): ``model/`` (weights and the layer runner),
``layouts/`` (how a prefix's KV is stored: geometry + codec), ``kvio/`` (one request's Fetch stream as
start/wait pairs), ``cachenet/`` (the cache shards: manifests, writes, streams, fail-over),
``policies/`` (loading policies and their registry), ``selection/`` (scoring math),
``observability/`` (metrics, tracing). ``core.py`` orchestrates a request, ``engine.py`` runs its
layers, ``servicer.py`` is the gRPC edge, ``server.py`` the process. It imports no cache-server module.
"""
