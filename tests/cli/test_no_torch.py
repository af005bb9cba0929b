"""The runtime never imports torch: checked in fresh interpreters, with torch made unimportable."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

# Importing every runtime module (whatever exists of it) and the CLI, then checking sys.modules.
IMPORT_ALL = textwrap.dedent("""
    import importlib, pkgutil, sys
    import cellsam_rt, cellsam_rt.cli
    OPTIONAL_GPU = {"tensorrt", "cuda", "pycuda"}  # absent on CPU machines, by design
    for mod in pkgutil.walk_packages(cellsam_rt.__path__, "cellsam_rt."):
        if mod.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(mod.name)
        except ImportError as exc:
            if (exc.name or "").split(".")[0] not in OPTIONAL_GPU:
                raise
    heavy = sorted(m for m in sys.modules
                   if m.split(".")[0] in ("torch", "cellsam_export", "torchvision"))
    assert not heavy, heavy
    print("ok", len([m for m in sys.modules if m.startswith("cellsam_rt")]))
""")


def _poisoned_env(tmp_path) -> dict:
    """An environment where `import torch` fails loudly, to catch indirect imports too."""
    poison = tmp_path / "poison" / "torch"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text(
        "raise ModuleNotFoundError('cellsam_rt must not import torch', name='torch')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(poison.parent), env.get("PYTHONPATH", "")])
    return env


def _run(args, env, timeout=120):
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_importing_the_runtime_does_not_import_torch(tmp_path):
    clean = _run(["-c", IMPORT_ALL], dict(os.environ))
    assert clean.returncode == 0, clean.stderr
    poisoned = _run(["-c", IMPORT_ALL], _poisoned_env(tmp_path))
    assert poisoned.returncode == 0, poisoned.stderr


def test_poison_really_blocks_torch(tmp_path):
    """Guard for the test above: the poisoned environment does make torch unimportable."""
    proc = _run(["-c", "import torch"], _poisoned_env(tmp_path))
    assert proc.returncode != 0 and "must not import torch" in proc.stderr


INFO_SCRIPT = textwrap.dedent("""
    import sys
    from cellsam_rt.cli.main import main
    rc = main(sys.argv[1:])
    assert "torch" not in sys.modules, "torch was imported"
    sys.exit(rc)
""")


def test_info_does_not_import_torch(tiny_model_dir, tmp_path):
    proc = _run(["-c", INFO_SCRIPT, "info", str(tiny_model_dir)], _poisoned_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    name = json.loads((tiny_model_dir / "manifest.json").read_text())["name"]
    assert name in proc.stdout and "decoder.fp16.onnx" in proc.stdout
    assert "CPUExecutionProvider" in proc.stdout


def test_run_does_not_import_torch(tiny_model_dir, tmp_path):
    if importlib.util.find_spec("cellsam_rt.pipeline.segmenter") is None:
        pytest.skip("pipeline.py not written yet")
    import numpy as np

    image = tmp_path / "img.npy"
    np.save(image, np.random.default_rng(0).integers(0, 255, (48, 40)).astype(np.uint8))
    out = tmp_path / "out"
    proc = _run(["-c", INFO_SCRIPT, "run", str(image), "--out", str(out), "--model",
                 str(tiny_model_dir), "--threads", "1", "--tile", "never", "--quiet"],
                _poisoned_env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "img_labels.tif").is_file()


def test_export_without_torch_says_how_to_install(tmp_path):
    proc = _run(["-m", "cellsam_rt.cli", "export", "--random-weights", "tiny", "--out",
                 str(tmp_path / "m")], _poisoned_env(tmp_path))
    assert proc.returncode == 2
    assert "pip install 'cellsam-rt[export]'" in proc.stderr
    assert "Traceback" not in proc.stderr
