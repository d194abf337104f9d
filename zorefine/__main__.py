from zorefine.cli import main

main()
