"""The compute server's side of the cache wire: shards, placement, quorum writes, Fetch streams and fail-over."""
