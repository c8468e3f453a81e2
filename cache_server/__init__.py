"""The storage node: stores and serves opaque fixed-size records of committed prefix objects.

Modules:

- stored objects: ``keys`` (object keys and their files), ``manifest`` (layout math and the
  manifest), ``checksum`` (the record CRC-32), ``writer`` / ``reader`` (one object's data file),
  ``recovery`` (the start-up scan of the root), ``store`` (the record store);
- the read path: ``buffers`` (aligned read buffers), ``read_process`` (disk reads in helper
  processes), ``dram_cache`` (records kept in memory) with ``eviction`` (its eviction rules) and
  ``dram_arena`` (its per-object shared memory, read in place by co-located clients),
  ``assemble`` (one Fetch response), ``fetch`` (one Fetch stream's scheduling), ``shm_plane``
  (the co-located clients' shared-memory data plane), ``native_aio`` (Linux AIO for the helpers);
- the process: ``config`` (the frozen config), ``errors``, ``stats`` (counters), ``metrics``
  (Prometheus), ``service`` (the thin gRPC servicer), ``server`` (flags, config and the process),
  ``__main__`` (``python -m contiguouskv.cache_server``).

It imports no torch, no model code and nothing of the compute server (``tests/test_import_graph.py``
checks this). What both servers share (the raw Fetch wire encoding, status details, config loading,
access checks, TLS and tokens, server lifecycle, placement) lives in ``contiguouskv/common``.
"""
