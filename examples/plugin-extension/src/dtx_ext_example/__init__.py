"""dtx-ext-example: a sampler and a loss weighting for dtx's EDM objective, registered by ``dtx_ext_example.plugin``."""

__version__ = "0.1.0"
