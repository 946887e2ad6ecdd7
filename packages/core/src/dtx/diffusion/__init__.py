"""Diffusion math: discrete Gaussian diffusion (DDPM/IDDPM), continuous sigma-space diffusion (EDM), guidance."""
