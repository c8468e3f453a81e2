"""Loading policies: which prefix KV a request reads and when (contract: ``policies/base.py``), by name (``registry.py``)."""
