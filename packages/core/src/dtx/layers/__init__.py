"""Building blocks shared by every dtx backbone, each written once."""

from .blocks import BlockStack, recompute_policy, recomputed, set_recompute
from .adaln import AdaLNBlock, FinalLayer, dit_base_init, layer_norm, residual
from .linear import Linear, linear, linear_backend, onednn_available, use_linear_backend
from .embeddings import FourierFeatures, LabelEmbedder, TimestepEmbedder, check_label_range, timestep_embedding
from .norms import AdaRMSNorm, LinearGEGLU, RMSNorm, gated_residual, geglu, modulate, rms_norm
from .patch import PatchEmbed, PatchGridConfig, TubeletEmbed, per_sample_timesteps, unpatchify
from .position import frame_positions, grid_positions, sincos_1d, sincos_1d_torch, sincos_2d, sincos_2d_torch
from .rope import AxialRoPE, apply_rotary, axial_rope_freqs, make_axial_pos, rope_angles
from .transformer import Attention, CrossAttention, Mlp
from .skeleton import DIT_SIZES, PatchTransformer, TransformerConfig, size_presets, text_tokens

__all__ = [
    "AdaLNBlock", "DIT_SIZES", "PatchTransformer", "size_presets", "TransformerConfig", "TubeletEmbed", "residual", "text_tokens", "BlockStack", "recompute_policy", "recomputed", "set_recompute", "dit_base_init", "AdaRMSNorm", "FinalLayer", "layer_norm", "Attention", "AxialRoPE", "CrossAttention", "FourierFeatures", "LabelEmbedder", "check_label_range", "Linear", "LinearGEGLU", "linear", "linear_backend", "onednn_available", "use_linear_backend",
    "Mlp", "PatchEmbed", "PatchGridConfig", "per_sample_timesteps", "RMSNorm", "TimestepEmbedder", "apply_rotary", "axial_rope_freqs", "geglu",
    "gated_residual", "make_axial_pos", "modulate", "rms_norm", "rope_angles", "frame_positions", "grid_positions", "sincos_1d", "sincos_1d_torch", "sincos_2d", "sincos_2d_torch",
    "timestep_embedding", "unpatchify",
]
