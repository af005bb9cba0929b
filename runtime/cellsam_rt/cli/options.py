"""Option groups shared by the commands, declared and validated once: every command that loads a
model takes the same --model/--backend/--precision/--threads, every command that segments the
same --tile/--chunk-size/--bbox-threshold/--channels, with the same defaults (so `bench`
measures what `run` does)."""
from __future__ import annotations

import argparse

from cellsam_rt.config import (AUGMENT_MODES, BACKENDS, DECODER_MODES, DENOISE_MODES, OUTLINES,
                               POLARITIES, PRECISIONS, TILE_MODES)
from cellsam_rt.errors import OptionError


def positive_int(text: str, minimum: int = 1) -> int:
    """argparse type: a whole number >= minimum."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    return positive_int(text, minimum=0)


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return value


def channels(text: str) -> tuple[int, ...]:
    """argparse type for --channels "N" or "N,W" (nuclear, whole-cell input channel indices)."""
    parts = [p.strip() for p in text.split(",")]
    if not 1 <= len(parts) <= 2:
        raise argparse.ArgumentTypeError("expected NUCLEAR or NUCLEAR,WHOLECELL (e.g. 0 or 0,1)")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"channel indices must be integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"channel indices start at 0, got {text!r}")
    return values


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --backend, --precision, --threads: which model runs where."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="default", metavar="M",
                   help="model directory, or 'default' for the model shipped with cellsam-rt "
                        "(default)")
    g.add_argument("--backend", choices=BACKENDS, default="cpu",
                   help="inference backend (default cpu); tensorrt-ep = TensorRT through "
                        "onnxruntime, tensorrt = native TensorRT engines")
    g.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="graph precision (default fp32); int8 = CPU only, after "
                        "`cellsam-rt quantize`")
    g.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for inference (default: all cores)")


def add_segmenter_options(parser: argparse.ArgumentParser, channels_option: bool = True) -> None:
    """--tile, --chunk-size, --bbox-threshold (and --channels): how an image is segmented."""
    g = parser.add_argument_group("segmentation")
    if channels_option:
        g.add_argument("--channels", type=channels, default=None, metavar="N[,W]",
                       help="input channel index of the nuclear stain and, optionally, of the "
                            "whole-cell stain (0-based); needed for images with >3 channels")
    g.add_argument("--tile", choices=TILE_MODES, default="auto",
                   help="tile large images: auto decides from the image and cell size "
                        "(default auto)")
    g.add_argument("--bbox-threshold", type=unit_float, default=None, metavar="X",
                   help="detection threshold (default: the model's, 0.4 for CellSAM)")
    g.add_argument("--chunk-size", type=positive_int, default=None, metavar="N",
                   help="boxes per mask-decoder call (default: the backend's, 4 on the CPU, 32 "
                        "on a GPU); bounds memory")
    g.add_argument("--diameter", type=positive_float, default=None, metavar="D",
                   help="typical cell diameter in pixels (in micrometres with --pixel-size), "
                        "that of a disc of the cell's area: the image is rescaled so that cells "
                        "come to the size the model knows (default: estimated from a first look "
                        "at the image; used with --tile auto and a model that states its object "
                        "diameter, as the default model does)")
    g.add_argument("--pixel-size", type=positive_float, default=None, metavar="UM",
                   dest="diameter_pixel_size",
                   help="pixel size in micrometres: --diameter is then in micrometres")
    g.add_argument("--polarity", choices=POLARITIES, default="auto",
                   help="objects brighter than the background (bright: fluorescence) or darker "
                        "(dark: brightfield-like, inverted stains; the image is inverted for the "
                        "model); auto inverts a single-channel image when its intensities look "
                        "inverted and the detector finds the objects surer so (default auto)")
    g.add_argument("--outline", choices=OUTLINES, default="auto",
                   help="mask outlines: model keeps the mask decoder's; contrast redraws each "
                        "mask's edge in a single-channel image at a fixed fraction of its "
                        "contrast with its surround, drops detections far fainter than the "
                        "image's others, keeps each mask in one piece and drops fragments "
                        "(masks far from convex or far smaller than the image's others); auto "
                        "takes the model's choice (contrast for the default model, model for "
                        "exported CellSAM) (default auto)")
    g.add_argument("--denoise", choices=DENOISE_MODES, default="auto",
                   help="camera noise: gaussian smooths an image whose intensity span is only a "
                        "few noise standard deviations, as much as its noise needs, before the "
                        "model reads it (clean images are left as they are); off reads every "
                        "image as given; auto takes the model's choice (off unless its manifest "
                        "states gaussian; off for the default model and exported CellSAM) "
                        "(default auto)")
    g.add_argument("--augment", choices=AUGMENT_MODES, default="auto",
                   help="test-time augmentation: flips segments each image as given and "
                        "mirrored three ways and keeps the cells at least two of the four views "
                        "find (fewer false and missed cells; four segmentations per image); off "
                        "segments it once; auto takes the model's choice (off for the default "
                        "model and exported CellSAM) (default auto)")
    g.add_argument("--decoder", choices=DECODER_MODES, default="auto",
                   help="mask decoder: auto decodes each box from a window of the image "
                        "embedding around it where the model has a windowed decoder (the "
                        "default model does), full always reads the whole embedding "
                        "(default auto)")


def segmenter_kwargs(args: argparse.Namespace) -> dict:
    """Segmenter(...) keyword arguments from the parsed model and segmentation options."""
    kw = dict(model=args.model, backend=args.backend, precision=args.precision,
              threads=args.threads)
    for name in ("tile", "bbox_threshold", "chunk_size", "decoder", "polarity", "outline",
                 "denoise", "augment"):
        if getattr(args, name, None) is not None:
            kw[name] = getattr(args, name)
    diameter = getattr(args, "diameter", None)
    pixel_size = getattr(args, "diameter_pixel_size", None)
    if pixel_size is not None and diameter is None:
        raise OptionError("--pixel-size needs --diameter (the cell diameter in micrometres)")
    if diameter is not None:
        kw["diameter"] = diameter / pixel_size if pixel_size else diameter
    return kw
