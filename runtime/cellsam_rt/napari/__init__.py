"""The cellsam-rt napari plugin (npe2): a Segment widget (automatic and box-prompted
segmentation), readers for run and tracking folders, a labels writer and a sample image.

napari imports the parts named in `napari.yaml` when they are first used; nothing here is
imported by the rest of cellsam-rt.
"""
