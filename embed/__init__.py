"""The unified encoder: items (text and images) in, unit vectors out. Pure PyTorch."""
