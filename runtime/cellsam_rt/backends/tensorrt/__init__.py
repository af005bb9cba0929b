"""Native TensorRT: engine naming, building and checking (`engines.py`), the backend
(`backend.py`). Importing this package does not import TensorRT."""
