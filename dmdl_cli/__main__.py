from dmdl_cli.cli import main

main()
