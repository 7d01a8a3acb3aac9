#!/usr/bin/env bash
# Build the documentation site (docs/*.md + the API reference generated from the docstrings by
# mkdocstrings) into build/site/ (git-ignored), with every warning an error (mkdocs.yml sets strict: true; --strict
# repeats it). The docstrings are read statically (griffe): torch need not be importable.
#   pip install "mkdocs" "mkdocstrings[python]"     # or: pip install -e ".[docs]"
#   bash scripts/build_docs.sh [extra mkdocs build arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONPATH="scripts${PYTHONPATH:+:$PYTHONPATH}" python -m mkdocs build --strict --clean --site-dir "${MMLOSS_DOCS_SITE:-build/site}" "$@"
