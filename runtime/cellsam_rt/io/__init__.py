"""Reading and writing: images (TIFF/OME-TIFF, PNG/JPEG, NPY) in `images.py`, the run's output
files in `outputs.py`."""
from cellsam_rt.errors import ImageReadError, OutputDirError
from cellsam_rt.io.images import expand_inputs, is_image_file, output_stem, read_image
from cellsam_rt.io.outputs import (atomic_write, outline_mask, overlay_outlines,
                                   prepare_output_dir, write_labels_tiff, write_png,
                                   write_table_csv)

__all__ = ["ImageReadError", "OutputDirError", "atomic_write", "expand_inputs", "is_image_file",
           "outline_mask", "output_stem", "overlay_outlines", "prepare_output_dir",
           "read_image", "write_labels_tiff", "write_png", "write_table_csv"]
