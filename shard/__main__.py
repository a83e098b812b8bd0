"""`python -m shardgen.shard`: the shard entry point."""

from shardgen.shard.main import main

main()
