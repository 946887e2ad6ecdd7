"""GenTron for dtx: text-to-image and text-to-video diffusion transformers with motion-free guidance."""

__version__ = "0.1.0"
