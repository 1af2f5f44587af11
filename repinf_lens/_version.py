"""The package version, in a leaf module: submodules read it from here, not from ``repinf_lens`` (no cycle)."""

__version__ = "0.1.0.dev0"

__all__ = ["__version__"]
