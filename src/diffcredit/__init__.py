"""DiffCredit: Shapley values of a diffusion model's global properties for its data contributors."""

__version__ = "0.1.0"
