"""Entry point for ``python -m quakeray``."""

import sys

from quakeray.cli import main

if __name__ == "__main__":
    sys.exit(main())
