"""The router–shard contract: stubs generated from generate.proto at build time."""
