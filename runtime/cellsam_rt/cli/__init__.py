"""The `cellsam-rt` command line: `main.py` holds the command registry and the entry point; each
command is one module here (its parser and a call into the library, nothing more)."""
