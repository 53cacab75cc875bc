"""The package version, in a module of its own so that pyattr.io can stamp files without
importing the package."""

__version__ = "0.1.0"
