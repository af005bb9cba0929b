"""The model directory written by `cellsam-rt export`: manifest reading and validation."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from cellsam_rt.config import (AUGMENT_MODES, DENOISE_MODES, GRAPH_NAMES, OPTIONAL_GRAPHS,
                               OUTLINES, PRECISIONS)
from cellsam_rt.errors import ModelDirError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_FIELDS = ("format_version", "name", "image_size", "embedding_shape", "mask_size",
                   "preprocessing", "graphs")
# The reference's values (docs/design.md §2.6-2.8); a manifest may override any of them.
DEFAULT_THRESHOLDS = {"bbox_threshold": 0.4, "iou_threshold": 0.5, "mask_threshold": 0.4,
                      "min_size": 25}
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models" / "default"




def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclass(frozen=True)
class ModelDir:
    """A validated model directory: the manifest plus the paths of its graph files."""

    path: Path
    manifest: Mapping[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> "ModelDir":
        """Read and validate `<path>/manifest.json` (a path to the manifest itself also works)."""
        path = Path(path).expanduser()
        if path.name == MANIFEST and path.is_file():
            path = path.parent
        manifest_path = path / MANIFEST
        if not path.exists():
            raise ModelDirError(f"{path}: model directory does not exist")
        if not path.is_dir():
            raise ModelDirError(f"{path}: not a model directory (expected a folder with {MANIFEST})")
        if not manifest_path.is_file():
            raise ModelDirError(f"{manifest_path}: missing; {path} is not a model directory")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelDirError(f"{manifest_path}: cannot read: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise ModelDirError(f"{manifest_path}: invalid JSON: {exc}") from exc
        _validate(manifest, path, manifest_path)
        return cls(path=path, manifest=manifest)

    @property
    def manifest_path(self) -> Path:
        """Where the manifest lives."""
        return self.path / MANIFEST

    @property
    def name(self) -> str:
        """The model's name from the manifest (e.g. "cellsam-v1.2")."""
        return str(self.manifest["name"])

    @property
    def description(self) -> str:
        """Free-text description, empty if the manifest has none."""
        return str(self.manifest.get("description", ""))

    @property
    def image_size(self) -> int:
        """Side S of the square network input [B,3,S,S]."""
        return int(self.manifest["image_size"])

    @property
    def embedding_shape(self) -> tuple[int, int, int]:
        """Per-image encoder output (C, h, w)."""
        c, h, w = self.manifest["embedding_shape"]
        return int(c), int(h), int(w)

    @property
    def mask_size(self) -> int:
        """Side of the decoder's low-resolution mask logits."""
        return int(self.manifest["mask_size"])

    @property
    def num_queries(self) -> int | None:
        """CellFinder query count (3500 for the official model), if recorded."""
        value = self.manifest.get("num_queries")
        return None if value is None else int(value)

    @property
    def preprocessing(self) -> Mapping[str, Any]:
        """The preprocessing section (mode and parity flags)."""
        return self.manifest["preprocessing"]

    @property
    def preprocessing_mode(self) -> str:
        """Preprocessing mode name ("cellsam" for the reference behaviour)."""
        return str(self.preprocessing.get("mode", "cellsam"))

    @property
    def has_model_cp(self) -> bool:
        """True when the checkpoint carried `model_cp`, which changes preprocessing."""
        return bool(self.preprocessing.get("has_model_cp", False))

    @property
    def thresholds(self) -> dict[str, float]:
        """Default thresholds: the manifest's values over the reference defaults."""
        return {**DEFAULT_THRESHOLDS, **self.manifest.get("thresholds", {})}

    @property
    def precisions(self) -> tuple[str, ...]:
        """Precisions this directory has graphs for, in manifest order."""
        return tuple(self.manifest["graphs"])

    def graph_path(self, name: str, precision: str = "fp32") -> Path:
        """Path of graph `name` ("encoder", "cellfinder", "decoder", or an optional graph such
        as "decoder_window" where the directory has it) in `precision`."""
        if name not in GRAPH_NAMES + OPTIONAL_GRAPHS:
            raise ModelDirError(f"{self.manifest_path}: unknown graph {name!r} "
                                f"(graphs are {', '.join(GRAPH_NAMES + OPTIONAL_GRAPHS)})")
        graphs = self.manifest["graphs"]
        if precision not in graphs:
            raise ModelDirError(f"{self.manifest_path}: no {precision} graphs in this model "
                                f"(available: {', '.join(graphs)})")
        if name not in graphs[precision]:
            raise ModelDirError(f"{self.manifest_path}: no {precision} {name} graph in this model")
        return self.path / graphs[precision][name]

    def has_graph(self, name: str, precision: str = "fp32") -> bool:
        """Whether the directory has graph `name` in `precision` (optional graphs may be absent)."""
        return name in self.manifest["graphs"].get(precision, {})

    @property
    def decoder_window(self) -> dict | None:
        """The windowed decoder's policy {"min", "max", "box_factor"[, "paste_factor"]} (window
        sides in embedding tokens), or None when the directory has no windowed decoder."""
        policy = self.manifest.get("decoder_window")
        return None if policy is None else {k: int(v) if k in ("min", "max") else float(v)
                                            for k, v in policy.items()}

    @property
    def object_diameter(self) -> float | None:
        """Median object diameter, in model-input pixels, the model works best at (None: not
        stated, so no automatic rescaling)."""
        d = self.manifest.get("object_diameter")
        return None if d is None else float(d)

    @property
    def box_diameter_ratio(self) -> float:
        """How much larger the detector's box diameter sqrt(w * h) is than the diameter of a disc
        of the object's area (1.0 when not stated): a diameter given or reported in the latter,
        as users measure cells, is converted with it."""
        return float(self.manifest.get("box_diameter_ratio", 1.0))

    @property
    def outline(self) -> str:
        """How the model's masks are outlined by default: "model" (as decoded) or "contrast"
        (each edge redrawn in the image, faint objects and fragments dropped, stages/outline.py)."""
        return str(self.manifest.get("outline", OUTLINES[1]))

    @property
    def denoise(self) -> str:
        """Whether very noisy images are smoothed before the model reads them by default: "off"
        or "gaussian" (stages/denoise.py)."""
        return str(self.manifest.get("denoise", DENOISE_MODES[1]))

    @property
    def augment(self) -> str:
        """Whether images are segmented in mirrored views too by default: "off" or "flips"
        (pipeline/augment.py)."""
        return str(self.manifest.get("augment", AUGMENT_MODES[1]))

    def cpu_graph_path(self, name: str, precision: str = "fp32") -> Path | None:
        """Path of graph `name`'s ONNX Runtime CPU variant in `precision` (fused attention,
        com.microsoft ops), or None when the directory has none."""
        rel = self.manifest.get("cpu_graphs", {}).get(precision, {}).get(name)
        return None if rel is None else self.path / rel

    @property
    def cpu_custom_ops(self) -> tuple[str, ...]:
        """"domain.Op" names of cellsam-rt kernels (cellsam_rt.kernels) that the CPU graphs, and
        INT8 graphs quantised from them, call; empty when they use ONNX Runtime's ops only."""
        return tuple(self.manifest.get("cpu_custom_ops", ()))


def _check_file(rel: Any, path: Path, manifest_path: Path, where: str, what: str) -> None:
    """A graph file entry: a plain relative name of an existing, non-empty file."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ModelDirError(f"{manifest_path}: {where} must be a file name inside the model "
                            f"directory, got {rel!r}")
    graph_file = path / rel
    if not graph_file.is_file():
        raise ModelDirError(f"{graph_file}: missing ({what} listed in {manifest_path})")
    if graph_file.stat().st_size == 0:
        raise ModelDirError(f"{graph_file}: empty file ({what})")


def _validate(manifest: Any, path: Path, manifest_path: Path) -> None:
    """Raise ModelDirError naming the manifest and the first problem found."""
    def fail(problem: str) -> None:
        raise ModelDirError(f"{manifest_path}: {problem}")

    if not isinstance(manifest, dict):
        fail("expected a JSON object at the top level")
    version = manifest.get("format_version")
    if version is None:
        fail("missing field 'format_version'")
    if not _is_int(version):
        fail(f"format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        fail(f"format_version {version} is newer than this cellsam-rt understands "
             f"({FORMAT_VERSION}); upgrade cellsam-rt")
    if version != FORMAT_VERSION:
        fail(f"unsupported format_version {version} (expected {FORMAT_VERSION})")
    missing = [f for f in REQUIRED_FIELDS if f not in manifest]
    if missing:
        fail(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    if not isinstance(manifest["name"], str) or not manifest["name"]:
        fail("name must be a non-empty string")

    size = manifest["image_size"]
    if not _is_int(size) or size <= 0:
        fail(f"image_size must be a positive integer, got {size!r}")
    emb = manifest["embedding_shape"]
    if (not isinstance(emb, list) or len(emb) != 3
            or not all(_is_int(v) and v > 0 for v in emb)):
        fail(f"embedding_shape must be 3 positive integers [C, h, w], got {emb!r}")
    _, h, w = emb
    if h != w:
        fail(f"embedding_shape {emb} is not square (image_size is square)")
    if size % h:
        fail(f"image_size {size} is not a multiple of the embedding side {h}")
    mask = manifest["mask_size"]
    # The SAM mask decoder upsamples the embedding grid 4x (docs/design.md §4).
    if not _is_int(mask) or mask != 4 * h:
        fail(f"mask_size must be 4x the embedding side ({4 * h}), got {mask!r}")
    for field in ("num_queries", "num_classes"):
        if field in manifest and (not _is_int(manifest[field]) or manifest[field] <= 0):
            fail(f"{field} must be a positive integer, got {manifest[field]!r}")

    pre = manifest["preprocessing"]
    if not isinstance(pre, dict):
        fail(f"preprocessing must be an object, got {pre!r}")
    if "has_model_cp" in pre and not isinstance(pre["has_model_cp"], bool):
        fail(f"preprocessing.has_model_cp must be true or false, got {pre['has_model_cp']!r}")

    thresholds = manifest.get("thresholds", {})
    if not isinstance(thresholds, dict):
        fail(f"thresholds must be an object, got {thresholds!r}")
    for key, value in thresholds.items():
        if not _is_number(value):
            fail(f"thresholds.{key} must be a number, got {value!r}")
        if key != "min_size" and not 0.0 <= value <= 1.0:
            fail(f"thresholds.{key} must lie in [0, 1], got {value!r}")
        if key == "min_size" and value < 0:
            fail(f"thresholds.min_size must be >= 0, got {value!r}")

    graphs = manifest["graphs"]
    if not isinstance(graphs, dict) or not graphs:
        fail(f"graphs must map a precision ({', '.join(PRECISIONS)}) to its graph files")
    for precision, files in graphs.items():
        if precision not in PRECISIONS:
            fail(f"graphs: unknown precision {precision!r} (expected {', '.join(PRECISIONS)})")
        if not isinstance(files, dict):
            fail(f"graphs.{precision} must map graph names to file names")
        for name in GRAPH_NAMES:
            if name not in files:
                fail(f"graphs.{precision} has no {name!r} graph")
        for name in files:
            if name not in GRAPH_NAMES + OPTIONAL_GRAPHS:
                fail(f"graphs.{precision}: unknown graph {name!r}")
            _check_file(files[name], path, manifest_path, f"graphs.{precision}.{name}",
                        f"{precision} {name} graph")

    window = manifest.get("decoder_window")
    if window is not None:
        side = manifest["embedding_shape"][1]
        factors = ("box_factor", "paste_factor")
        if (not isinstance(window, dict)
                or not {"min", "max", "box_factor"} <= set(window) <= {"min", "max", *factors}
                or not all(isinstance(window[k], int) and 1 <= window[k] <= side
                           for k in ("min", "max"))
                or window["min"] > window["max"]
                or not all(isinstance(window.get(k, 1), (int, float)) and window.get(k, 1) > 0
                           for k in factors)):
            fail(f"decoder_window must be {{\"min\": int, \"max\": int, \"box_factor\": number}} "
                 f"(optionally \"paste_factor\": number) with 1 <= min <= max <= {side}, "
                 f"got {window!r}")
        if not any("decoder_window" in files for files in graphs.values()):
            fail("decoder_window is set but no precision has a decoder_window graph")
    diameter = manifest.get("object_diameter")
    if diameter is not None and (not isinstance(diameter, (int, float)) or isinstance(diameter, bool)
                                 or not 0 < diameter < manifest["image_size"]):
        fail(f"object_diameter must be a number of pixels in (0, image_size), got {diameter!r}")

    ratio = manifest.get("box_diameter_ratio", 1.0)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.5 <= ratio <= 2.0:
        fail(f"box_diameter_ratio must be a number in [0.5, 2], got {ratio!r}")
    # A manifest states a mode itself: any of the option's modes but "auto" (the first when none).
    for key, modes in (("outline", OUTLINES), ("denoise", DENOISE_MODES),
                       ("augment", AUGMENT_MODES)):
        value = manifest.get(key, modes[1])
        if value not in modes[1:]:
            fail(f"{key} must be one of {', '.join(map(repr, modes[1:]))}, got {value!r}")

    ops = manifest.get("cpu_custom_ops", [])
    if not isinstance(ops, list) or not all(isinstance(o, str) and "." in o for o in ops):
        fail(f"cpu_custom_ops must be a list of \"domain.Op\" names, got {ops!r}")

    # Optional ONNX Runtime CPU variants of some graphs (fused attention): precision -> graph -> file.
    cpu = manifest.get("cpu_graphs", {})
    if not isinstance(cpu, dict):
        fail(f"cpu_graphs must map a precision to graph files, got {cpu!r}")
    for precision, files in cpu.items():
        if precision not in graphs:
            fail(f"cpu_graphs: precision {precision!r} has no entry in graphs")
        if not isinstance(files, dict):
            fail(f"cpu_graphs.{precision} must map graph names to file names")
        for name, rel in files.items():
            if name not in GRAPH_NAMES:
                fail(f"cpu_graphs.{precision}: unknown graph {name!r}")
            _check_file(rel, path, manifest_path, f"cpu_graphs.{precision}.{name}",
                        f"{precision} {name} CPU graph")


def resolve_model(spec: "str | Path | ModelDir | None" = "default") -> ModelDir:
    """Load the model named by `spec`: "default"/None is the shipped model, anything else a path."""
    if isinstance(spec, ModelDir):
        return spec
    if spec is None or str(spec) == "default":
        if not (DEFAULT_MODEL_DIR / MANIFEST).is_file():
            raise ModelDirError(
                f"{DEFAULT_MODEL_DIR}: the default model is not installed with this copy of "
                "cellsam-rt; export one with `cellsam-rt export --checkpoint cellsam_general.pt "
                "--out DIR` (needs pip install 'cellsam-rt[export]') and pass --model DIR")
        return ModelDir.load(DEFAULT_MODEL_DIR)
    return ModelDir.load(spec)
