from lqmf.cli.app import main

main()
