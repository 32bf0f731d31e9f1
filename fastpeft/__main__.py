"""`python -m fastpeft ...` runs the `fastpeft` command (fastpeft/cli.py)."""
import sys

from fastpeft.cli import main

if __name__ == "__main__":
    sys.exit(main())
