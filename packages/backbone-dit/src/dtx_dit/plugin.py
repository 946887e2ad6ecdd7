"""dtx plugin entry point of dtx-backbone-dit (filled by the DiT issue)."""
