"""CellSAM's building blocks: SAM (from segment-anything), CellFinder and Anchor-DETR."""
