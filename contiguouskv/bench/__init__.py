"""Benchmarks of the ``contiguouskv bench`` command (each module: ``add_arguments`` and ``run``)."""
