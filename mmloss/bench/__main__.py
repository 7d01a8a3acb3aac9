"""Entry point of ``python -m mmloss.bench`` (see ``mmloss.bench.cli``)."""
import sys

from .cli import main, reexec_with_malloc_threshold

if __name__ == "__main__":
    reexec_with_malloc_threshold()
    sys.exit(main())
