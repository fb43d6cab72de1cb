from omnissl.cli import main

main()
