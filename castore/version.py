"""castore's version, in a module of its own: the modules castore/__init__.py imports read it from here, not from
the package they are part of (an import circle)."""

__version__ = "0.1.0"
