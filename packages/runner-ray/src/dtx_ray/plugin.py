"""dtx plugin entry point of dtx-runner-ray (filled by the training issue)."""
