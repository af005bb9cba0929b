"""`cellsam-rt export` (cellsam_export.export_cli): a working export and one-line errors."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from cellsam_export import export_cli  # noqa: E402


def run(argv: list[str]) -> int:
    """Parse `argv` with the export options and run the export, as the CLI does."""
    parser = export_cli.add_export_arguments(argparse.ArgumentParser(prog="cellsam-rt export"))
    return export_cli.run_export(parser.parse_args(argv))


def one_error_line(capsys) -> str:
    """The one error line of a failed export (progress lines may precede it, no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("cellsam-rt export: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    assert not any("Traceback" in line for line in err), err
    return errors[0]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random checkpoint file."""
    from cellsam_export.testing import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("cli") / "tiny.pt", config="tiny", seed=0)


@pytest.mark.slow  # one more whole export; the fixtures' exports cover the exporter
def test_export_from_checkpoint_with_force(tmp_path: Path, tiny_ckpt: Path, capsys):
    """A checkpoint exports to a model dir; --force replaces an existing one; progress on stderr."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "marker").write_text("old")
    assert run(["--checkpoint", str(tiny_ckpt), "--out", str(out), "--no-fp16", "--no-cpu-graphs",
                "--force"]) == 0
    assert not (out / "marker").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["checkpoint"] == "tiny.pt" and manifest["source"]["config"] == "tiny"
    assert list(manifest["graphs"]) == ["fp32"]
    assert "cpu_graphs" not in manifest and not list(out.glob("*.cpu.onnx"))
    err = capsys.readouterr().err
    assert "exported encoder" in err and "exported decoder" in err and "done in" in err


def test_random_weights_reach_the_exporter(tmp_path: Path, monkeypatch, capsys):
    """--random-weights builds the named config with seeded TSV-style weights and no checkpoint."""
    import torch

    from cellsam_export import onnx_export
    from cellsam_export.checkpoint import random_state_dict

    seen = {}

    def fake_export(loaded, out, fp16, opset, force, progress, cpu_graphs, cpu_kernels):
        seen.update(model=loaded[0], info=loaded[1], out=out, fp16=fp16, opset=opset, force=force,
                    cpu_graphs=cpu_graphs, cpu_kernels=cpu_kernels)
        return out

    monkeypatch.setattr(onnx_export, "export_model_dir", fake_export)
    out = tmp_path / "m"
    assert run(["--random-weights", "tiny", "--seed", "3", "--with-model-cp", "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().err == ""  # --quiet
    assert seen["info"]["config_name"] == "tiny" and seen["info"]["random_seed"] == 3
    assert seen["info"]["path"] is None and seen["info"]["has_model_cp"] is True
    assert seen["fp16"] is True and seen["opset"] == 18 and seen["force"] is False  # defaults
    assert seen["cpu_graphs"] is True and seen["cpu_kernels"] is True
    expected = random_state_dict("tiny", with_model_cp=True, seed=3)
    got = seen["model"].state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert run(["--random-weights", "tiny", "--out", str(tmp_path / "n"), "--quiet",
                "--no-cpu-kernels"]) == 0
    assert seen["cpu_kernels"] is False


def test_out_exists_without_force(tmp_path: Path, tiny_ckpt: Path, capsys):
    """An existing --out is refused before any work, and left as it was."""
    out = tmp_path / "model"
    out.mkdir()
    assert run(["--checkpoint", str(tiny_ckpt), "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert "already exists" in line and "--force" in line
    assert list(out.iterdir()) == []


def test_missing_checkpoint(tmp_path: Path, capsys):
    """A checkpoint path that does not exist is named in the error."""
    missing = tmp_path / "nope.pt"
    assert run(["--checkpoint", str(missing), "--out", str(tmp_path / "m")]) == 2
    line = one_error_line(capsys)
    assert "not found" in line and "nope.pt" in line
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("content", [b"this is not a checkpoint\n", b""])
def test_not_a_checkpoint(tmp_path: Path, content: bytes, capsys):
    """A file that is not a checkpoint gives one clear line and no output directory."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    assert run(["--checkpoint", str(bad), "--out", str(tmp_path / "m")]) == 2
    line = one_error_line(capsys)
    assert "bad.pt" in line
    assert not (tmp_path / "m").exists()


def test_wrong_model_checkpoint(tmp_path: Path, capsys):
    """A state dict of some other model is refused with its key mismatch, not exported."""
    import torch

    other = tmp_path / "other.pt"
    torch.save({"backbone.weight": torch.zeros(3)}, other)
    assert run(["--checkpoint", str(other), "--out", str(tmp_path / "m")]) == 2
    line = one_error_line(capsys)
    assert "missing keys" in line or "unexpected keys" in line
    assert not (tmp_path / "m").exists()


def test_unknown_random_config(tmp_path: Path, capsys):
    """--random-weights with an unknown config lists the known ones."""
    assert run(["--random-weights", "huge", "--out", str(tmp_path / "m")]) == 2
    line = one_error_line(capsys)
    assert "'huge'" in line and "tiny" in line and "full" in line


def test_torch_not_installed(tmp_path: Path, monkeypatch, capsys):
    """Without the export extra the error says what to install."""
    real = export_cli._find_spec
    monkeypatch.setattr(export_cli, "_find_spec", lambda name: None if name == "torch" else real(name))
    assert run(["--random-weights", "tiny", "--out", str(tmp_path / "m")]) == 2
    line = one_error_line(capsys)
    assert "torch" in line and "pip install 'cellsam-rt[export]'" in line


def test_checkpoint_and_random_weights_are_exclusive(tmp_path: Path):
    """Exactly one weight source is required."""
    with pytest.raises(SystemExit):
        run(["--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit):
        run(["--checkpoint", "a.pt", "--random-weights", "tiny", "--out", str(tmp_path / "m")])


def test_module_does_not_import_torch_at_import_time():
    """The runtime CLI imports export_cli lazily; importing it must not pull torch in."""
    import subprocess
    import sys

    code = ("import sys; import cellsam_export.export_cli as m; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
