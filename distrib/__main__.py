"""`python -m distrib ...` runs the `distrib` command line."""

from distrib._cli.main import main

if __name__ == "__main__":
    main()
