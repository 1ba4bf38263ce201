"""DiffCredit: Shapley values of a diffusion model's global properties for its data contributors."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diffcredit")  # one place for the version: pyproject.toml
except PackageNotFoundError:  # imported from a source tree (e.g. PYTHONPATH=src) without installing
    __version__ = "0+unknown"
