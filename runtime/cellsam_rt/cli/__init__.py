"""The `cellsam-rt` command line: `main.py` holds the command registry, one module per command."""
from .main import main

__all__ = ["main"]
