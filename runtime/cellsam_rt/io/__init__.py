"""Reading and writing: images (TIFF/OME-TIFF, PNG/JPEG, NPY) and the run's output files."""
from .images import (ImageReadError, OutputDirError, atomic_write, expand_inputs, is_image_file,
                     label_dtype, outline_mask, output_stem, overlay_outlines, prepare_output_dir,
                     read_image, write_labels_tiff, write_png, write_table_csv)

__all__ = ["ImageReadError", "OutputDirError", "atomic_write", "expand_inputs", "is_image_file",
           "label_dtype", "outline_mask", "output_stem", "overlay_outlines", "prepare_output_dir",
           "read_image", "write_labels_tiff", "write_png", "write_table_csv"]
