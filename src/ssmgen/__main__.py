"""`python -m ssmgen ...` (and `torchrun -m ssmgen train ...`) run the CLI."""

from ssmgen.cli import main

if __name__ == "__main__":
    main()
