from postctl.cli import main

main()
