from alignspec.cli import main

main()
