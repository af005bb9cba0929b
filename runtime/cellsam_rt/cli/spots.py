"""`cellsam-rt spots`: assign RNA spots to the cells of a label image (or of a density image)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .main import EXIT_FAILED_INPUTS, EXIT_OK, EXIT_USAGE, error
from .options import add_model_options, non_negative_float, positive_float, segmenter_kwargs

USAGE = ("cellsam-rt spots (LABELS SPOTS | --segment-density SPOTS) --out DIR [--pixel-size UM] "
         "[--expand X] [--expand-units {px,um}] [options]")


def _pixel_size(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected µm per pixel or 'auto', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _columns(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(","):
        key, sep, name = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("x", "y", "gene") or not name.strip():
            raise argparse.ArgumentTypeError(
                f"expected x=COL,y=COL,gene=COL (any of them), got {text!r}")
        out[key] = name.strip()
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cellsam-rt spots`."""
    parser.usage = USAGE
    parser.description = (
        "Assign each spot of a spots table (x, y, gene; CSV or Parquet) to the cell under it and "
        "count genes per cell. Writes <name>_spots.csv|.parquet (the table plus a `cell` column, "
        "0 = no cell), <name>_cells.h5ad (AnnData) and <name>_counts.csv, named after SPOTS.")
    parser.add_argument("inputs", nargs="*", metavar="LABELS SPOTS",
                        help="label image (TIFF, or an OME-Zarr labels folder: level 0) and the "
                             "spots table")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="output folder (created if missing)")
    parser.add_argument("--pixel-size", type=_pixel_size, default=None, metavar="UM",
                        help="spot coordinates are microns, at UM µm per label-image pixel; "
                             "'auto' = from the label image's metadata (OME-TIFF PhysicalSizeX, "
                             "NGFF scale). Default: coordinates are pixels")
    parser.add_argument("--expand", type=non_negative_float, default=None, metavar="X",
                        help="grow cells by X into the background before assigning, never into "
                             "a neighbour (default: no growth)")
    parser.add_argument("--expand-units", choices=("px", "um"), default="px",
                        help="unit of --expand: label-image pixels (default) or microns")
    parser.add_argument("--allow-outside", action="store_true",
                        help="accept tables with more than 5%% of the spots outside the image "
                             "(they are counted, not assigned)")
    parser.add_argument("--columns", type=_columns, default=None, metavar="x=C,y=C,gene=C",
                        help="names of the coordinate and gene columns if not x, y, gene (e.g. "
                             "x=x_location,y=y_location,gene=feature_name)")
    parser.add_argument("--no-counts-csv", action="store_true",
                        help="skip the dense <name>_counts.csv (large for many cells x genes)")
    density = parser.add_argument_group(
        "segmenting from the spots (no stain)",
        "Render a Gaussian-blurred density of the spots and segment it with CellSAM; also writes "
        "<name>_density.tif and <name>_labels.tif.")
    density.add_argument("--segment-density", type=Path, default=None, metavar="SPOTS",
                         help="segment this spots table's density instead of reading LABELS")
    density.add_argument("--density-pixel-size", type=positive_float, default=1.0, metavar="U",
                         help="density-image pixel size in the spots' units, usually µm "
                              "(default 1.0); cells should come out ~10-60 pixels wide")
    density.add_argument("--density-sigma", type=non_negative_float, default=1.0, metavar="PX",
                         help="Gaussian blur of the density, in density pixels (default 1.0)")
    add_model_options(parser)
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar or summary line; errors and warnings are printed")


def run(args: argparse.Namespace) -> int:
    """Check the inputs, assign, write; one-line errors, exit 2 for bad input."""
    from ..io import ImageReadError, OutputDirError, output_stem, prepare_output_dir
    from ..io.label_images import read_label_image
    from ..workflows.spots import (
        SpotsError,
        assign_spots_for_run,
        format_summary,
        segment_spots_for_run,
    )

    from ..pipeline import Segmenter

    density = args.segment_density is not None
    if density and (args.inputs or args.pixel_size is not None):
        error("--segment-density takes only the spots table (no LABELS, no --pixel-size: the "
              "density's pixel size is --density-pixel-size)")
        return EXIT_USAGE
    if not density and len(args.inputs) != 2:
        error(f"expected LABELS SPOTS (or --segment-density SPOTS), got {len(args.inputs)} "
              "path(s)")
        return EXIT_USAGE
    spots_path = args.segment_density if density else Path(args.inputs[1])
    options = {"expand": args.expand, "expand_units": args.expand_units,
               "allow_outside": args.allow_outside, "columns": args.columns,
               "counts_csv": not args.no_counts_csv}
    bar = _StepBar(3 if not density else 4, args.quiet)
    try:
        out_dir = prepare_output_dir(args.out)
        if density:
            summary = segment_spots_for_run(
                spots_path, out_dir, output_stem(spots_path), Segmenter(**segmenter_kwargs(args)),
                density_pixel_size=args.density_pixel_size, sigma=args.density_sigma,
                progress=bar, **options)
        else:
            labels_path = Path(args.inputs[0])
            image = read_label_image(labels_path)
            if args.pixel_size is None and image.pixel_size is not None and not args.quiet:
                bar.write(f"note: {labels_path}: the image has {image.pixel_size:g} µm per pixel; "
                          "spot coordinates are read as pixels (--pixel-size auto for microns)")
            summary = assign_spots_for_run(image.labels, spots_path, out_dir,
                                           output_stem(spots_path), args.pixel_size,
                                           image_path=labels_path, progress=bar, **options)
    except (SpotsError, ImageReadError, OutputDirError) as exc:
        bar.close()
        error(exc)
        return EXIT_USAGE
    except OSError as exc:  # writing failed (disk full, permissions): inputs were fine
        bar.close()
        error(f"{args.out}: {exc}")
        return EXIT_FAILED_INPUTS
    finally:
        bar.close()  # also before an error main() reports (e.g. a bad --model)
    for line in summary["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    if not args.quiet:
        print(f"{spots_path}: {format_summary(summary)} -> {out_dir / output_stem(spots_path)}_*")
    return EXIT_OK


class _StepBar:
    """tqdm over the named steps of the work; callable with the next step's name."""

    def __init__(self, steps: int, quiet: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=steps, disable=quiet or None, unit="step", leave=False,
                        file=sys.stderr)
        self.started = False

    def __call__(self, name: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_description(name)

    def write(self, line: str) -> None:
        """A line on stderr that does not tear the bar."""
        self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


# -- for `cellsam-rt run --spots` -------------------------------------------------------------

def add_run_spots_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `cellsam-rt run` offers to assign spots to the cells it has just found."""
    group = parser.add_argument_group("spots", "assign RNA spots to the segmented cells "
                                               "(see `cellsam-rt spots --help`)")
    group.add_argument("--spots", type=Path, default=None, metavar="FILE",
                       help="spots table (CSV/Parquet: x, y, gene); writes <name>_spots.csv|"
                            ".parquet, <name>_cells.h5ad and <name>_counts.csv")
    group.add_argument("--spots-pixel-size", type=_pixel_size, default=None, metavar="UM",
                       help="spot coordinates are microns at UM µm per pixel, or 'auto' from "
                            "the image's metadata (default: pixels)")
    group.add_argument("--spots-expand", type=non_negative_float, default=None, metavar="X",
                       help="grow cells by X before assigning, never into a neighbour")
    group.add_argument("--spots-expand-units", choices=("px", "um"), default="px",
                       help="unit of --spots-expand (default px)")
    group.add_argument("--spots-columns", type=_columns, default=None, metavar="x=C,y=C,gene=C",
                       help="coordinate and gene column names if not x, y, gene")
    group.add_argument("--spots-allow-outside", action="store_true",
                       help="accept more than 5%% of the spots outside the image")


def assign_run_spots(args: argparse.Namespace, labels, image_path: Path, out_dir: Path,
                     name: str) -> dict:
    """Assign args.spots to one segmented image's labels; returns the summary.

    Raises SpotsError (a ValueError, one line naming the spots file) for an unusable table.
    """
    from ..workflows.spots import assign_spots_for_run

    return assign_spots_for_run(labels, args.spots, out_dir, name, args.spots_pixel_size,
                                args.spots_expand, args.spots_expand_units,
                                image_path=image_path, allow_outside=args.spots_allow_outside,
                                columns=args.spots_columns)
