from ferry.adapters.cli import main

main()
