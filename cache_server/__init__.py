"""The storage node: stores and serves opaque fixed-size records of committed prefix objects.

Modules: ``keys`` (object keys and their files), ``manifest`` (layout math and the manifest),
``writer`` / ``reader`` (one object's data file), ``read_process`` (disk reads in helper
processes), ``store`` (the record store), ``fetch`` (one Fetch stream's scheduling), ``service``
(the thin gRPC servicer), ``server`` (flags, config and the process). It never imports model code
or torch.
"""
