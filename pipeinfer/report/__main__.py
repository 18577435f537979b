"""python -m pipeinfer.report: see cli.py."""

import sys

from pipeinfer.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
