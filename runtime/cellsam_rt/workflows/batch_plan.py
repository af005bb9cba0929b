"""What a run works on: its items (image files, OME-Zarr images / plate fields) and where their
outputs go (`RunTarget`): one target under --out, or one per store (<store>/tables/)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from cellsam_rt.io import ngff

STORE_TABLES = "tables"  # run folder inside a store when no --out is given


@dataclass
class WorkItem:
    """One image to segment: a file or an OME-Zarr image (a plate's field)."""

    key: str
    source: "Path | ngff.NgffImage | None"
    name: str | None = None          # output base name of a file's results
    error: Exception | None = None   # a problem found while listing (reported, counted failed)

    @property
    def is_zarr(self) -> bool:
        return isinstance(self.source, ngff.NgffImage)

    def keys(self) -> dict:
        """The table's key columns for this image."""
        if self.is_zarr:
            im = self.source
            return {"plate": im.plate, "row": im.row, "column": im.column, "field": im.field,
                    "file": None if im.plate else self.key}
        return {"file": str(self.source)}


@dataclass
class RunTarget:
    """Where one run's outputs go: its folder (table, ledger, parts) and the label destinations."""

    run_dir: Path
    files_dir: Path | None = None    # <name>_labels.tif etc. (None: no file inputs allowed)
    mirror_root: Path | None = None  # zarr labels into mirrored stores here (None: in the input)
    names: dict = field(default_factory=dict)  # output stems handed out so far (for -2, -3)
    ledger: Any = None                # the run's Ledger, opened by BatchEngine.run

    def file_name(self, path: Path) -> str:
        """Result base name; repeated names get -2, -3, ... so nothing is overwritten."""
        from cellsam_rt.io import output_stem

        stem = output_stem(path)
        self.names[stem] = self.names.get(stem, 0) + 1
        return stem if self.names[stem] == 1 else f"{stem}-{self.names[stem]}"


def file_item(path: Path, target: RunTarget) -> WorkItem:
    return WorkItem(key=str(Path(path).resolve()), source=Path(path),
                    name=target.file_name(Path(path)))


def store_items(store: Path, level: int = 0) -> Iterator[WorkItem]:
    """One WorkItem per image of an OME-Zarr store; problems become items carrying the error."""
    for im in ngff.iter_images(store, level=level):
        if isinstance(im, ngff.NgffImage):
            yield WorkItem(key=f"{im.store.resolve()}/{im.path}".rstrip("/"), source=im)
        else:
            yield WorkItem(key=f"error:{im}", source=None, error=im)


class UsageError(ValueError):
    """Inputs and options that cannot make a run (exit status 2)."""


def split_inputs(specs: Sequence[str]) -> list["Path"]:
    """Files (as expand_inputs lists them) and OME-Zarr stores, in the order given.

    A folder that is a zarr store is one input; a folder holding stores gives its stores (and its
    image files); globs may match either.
    """
    import glob
    import os

    from cellsam_rt.io import expand_inputs, is_image_file

    out: list[Path] = []
    for spec in specs:
        text = os.path.expanduser(str(spec))
        path = Path(text)
        matches = [path] if path.exists() or not any(c in text for c in "*?[") else \
            [Path(m) for m in sorted(glob.glob(text))]
        for m in matches or [path]:
            if ngff.is_ngff_store(m):
                out.append(m)
            elif m.is_dir():
                stores = sorted(p for p in m.iterdir() if ngff.is_ngff_store(p))
                has_images = any(p.is_file() and is_image_file(p) for p in m.iterdir())
                out += stores
                if has_images or not stores:
                    out += expand_inputs([str(m)])
            else:
                out += expand_inputs([str(m)])
    return list(dict.fromkeys(out))


def plan(specs: Sequence[str], out: "Path | None", level: int = 0
         ) -> list[tuple[RunTarget, list[WorkItem]]]:
    """Run targets and their items: one target under --out, else one per store (<store>/tables)."""
    inputs = split_inputs(specs)
    if not inputs:
        raise UsageError("no inputs")
    files = [p for p in inputs if not ngff.is_ngff_store(p)]
    if out is None:
        if files:
            raise UsageError(f"{files[0]}: image files need --out DIR (only OME-Zarr stores "
                             "can take their labels and table in place)")
        return [(RunTarget(run_dir=p / STORE_TABLES), list(store_items(p, level)))
                for p in inputs]
    target = RunTarget(run_dir=Path(out), files_dir=Path(out), mirror_root=Path(out))
    items: list[WorkItem] = []
    for p in inputs:
        items += list(store_items(p, level)) if ngff.is_ngff_store(p) else [file_item(p, target)]
    return [(target, items)]


__all__ = ["RunTarget", "STORE_TABLES", "UsageError", "WorkItem", "file_item", "plan",
           "split_inputs", "store_items"]
