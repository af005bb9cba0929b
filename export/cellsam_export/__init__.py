"""CellSAM in PyTorch: strict checkpoint loading, the reference pipeline and ONNX export."""
__version__ = "0.1.0"
