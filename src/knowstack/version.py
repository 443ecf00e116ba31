"""knowstack's version: the package's `__version__`, and what a built world records it was built with."""

__version__ = "0.1.0"
