"""One request's KV I/O: start/wait pairs over a Fetch stream, fail-over replay and staging to the device."""
