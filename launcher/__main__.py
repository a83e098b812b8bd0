from shardgen.launcher.main import main

main()
