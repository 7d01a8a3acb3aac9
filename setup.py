"""Build script.

The package is pure Python today; the C++/CUDA backends in ``csrc/`` will be compiled here as
``mmloss._C`` against the *installed* torch (build without isolation), controlled by
``MMLOSS_BUILD_CUDA=auto|0|1``. Metadata lives in pyproject.toml.
"""
from setuptools import setup

setup()
