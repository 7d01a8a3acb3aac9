"""``python -m mmloss.check``: run the self-test and exit with its status (see ``mmloss.check``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
