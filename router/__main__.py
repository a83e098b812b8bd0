"""`python -m shardgen.router`: the same as `shardgen-router`."""

from shardgen.router.main import main

main()
