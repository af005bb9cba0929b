"""Training of the small default model on synthetic images (PyTorch; the [export] extra)."""
