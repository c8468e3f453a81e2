"""ContiguousKV: prefix-KV-cache offloading for LLM Re-Prefill.

Subpackages: ``contiguouskv.cache_server`` (storage node), ``contiguouskv.compute_server`` (model
and Re-Prefill), ``contiguouskv.client`` (SDK), ``contiguouskv.v1`` (generated wire contract),
``contiguouskv.common`` (config and logging helpers shared by the servers).
"""

__version__ = "0.1.0"
