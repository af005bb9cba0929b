"""The pipeline's stages, each a pure array -> array step, in the order data flows:
preprocess -> detect (CellFinder output -> boxes) -> masks (decoder output -> pasted masks)
-> postprocess (hole filling, cell table); tiling splits large images and stitches them back."""
