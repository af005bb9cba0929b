"""`python -m cellsam_train`: train the small default model (see train.py)."""
import sys

from .train import main

sys.exit(main())
