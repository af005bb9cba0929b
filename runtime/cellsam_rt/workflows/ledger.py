"""The run's ledger: which images are finished, from which input, model and options.

An append-only JSON-lines file, one record per line, fsync'd after each append. A kill can only
tear the last line; reading drops a torn tail (and truncates it away before the next append), so
the ledger always lists exactly the images whose outputs were completely written.

Records: {"event": "start", "key": ...} before an image's outputs are written (so its own
half-written label image may be replaced on a rerun), and {"event": "done", "key", "input",
"model", "options", "outputs"} after they are all in place.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

LEDGER_NAME = "ledger.jsonl"


class Ledger:
    """Finished images of a run (latest record per key), appended durably."""

    def __init__(self, path: "str | Path"):
        self.path = Path(path)
        self._lock = threading.Lock()
        self.done: dict[str, dict] = {}
        self.started: set[str] = set()
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last line from a kill: drop it
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
                os.fsync(fh.fileno())
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            key = rec.get("key")
            if rec.get("event") == "done":
                self.done[key] = rec
            elif rec.get("event") == "start":
                self.started.add(key)
            elif rec.get("event") == "forget":
                self.done.pop(key, None)

    def _append(self, rec: Mapping[str, Any]) -> None:
        line = (json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def start(self, key: str) -> None:
        """Note that `key`'s outputs are about to be (re)written by this run."""
        if key not in self.started:
            self._append({"event": "start", "key": key})
            self.started.add(key)

    def finish(self, key: str, input_fp: Mapping[str, Any], model: str,
               options: Mapping[str, Any], outputs: Iterable[str] = ()) -> None:
        """Record `key` as finished; call only once all its outputs are in place.

        `outputs` are paths relative to the ledger's folder (so the run folder can be moved).
        """
        rec = {"event": "done", "key": key, "input": dict(input_fp), "model": model,
               "options": dict(options), "outputs": list(outputs)}
        self._append(rec)
        with self._lock:
            self.done[key] = rec

    def owns(self, key: str) -> bool:
        """True when this ledger's runs wrote (or began writing) `key`'s outputs."""
        return key in self.started or key in self.done

    def status(self, key: str, input_fp: Mapping[str, Any], model: str,
               options: Mapping[str, Any]) -> str:
        """"new", "done" (skip it), or why it must be redone: "input", "model" or "options"."""
        rec = self.done.get(key)
        if rec is None:
            return "new"
        if rec.get("input") != _plain(input_fp):
            return "input"
        if rec.get("model") != model:
            return "model"
        if not _same_options(rec.get("options"), _plain(options)):
            return "options"
        if any(not (self.path.parent / p).exists() for p in rec.get("outputs", [])):
            return "new"  # an output was deleted since
        return "done"

    def finished_keys(self) -> list[str]:
        """Finished keys in the order they were first finished."""
        return list(self.done)


def _same_options(recorded: Any, now: dict) -> bool:
    """Whether a record's options are `now`'s. An option the record lacks came into cellsam-rt
    after that run: left at its automatic setting ("auto" or unset), it reads the image as that
    run did, so an upgrade does not redo a finished plate."""
    if not isinstance(recorded, dict):
        return recorded == now
    added = set(now) - set(recorded)
    return (all(now[k] in ("auto", None) for k in added)
            and recorded == {k: v for k, v in now.items() if k not in added})


def _plain(obj: Any) -> Any:
    """What a value looks like after a JSON round trip (tuples -> lists)."""
    return json.loads(json.dumps(obj, sort_keys=True))


# -- fingerprints ----------------------------------------------------------------------------

def file_fingerprint(path: "str | Path") -> dict:
    """Path, size and modification time of an input file."""
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def zarr_fingerprint(array_dir: "str | Path") -> dict:
    """A zarr array's metadata plus the names, sizes and mtimes of its chunk files (hashed).

    Cheap (a directory walk, no pixel reads) and changes whenever a chunk is rewritten.
    """
    root = Path(array_dir)
    h = hashlib.sha256()
    n = 0
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            if f.endswith(".partial"):
                continue
            p = os.path.join(dirpath, f)
            st = os.stat(p)
            rel = os.path.relpath(p, root)
            if f in ("zarr.json", ".zarray", ".zattrs"):
                with open(p, "rb") as fh:
                    h.update(rel.encode() + b"\0" + fh.read() + b"\0")
            else:
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
                n += 1
    return {"path": str(root.resolve()), "chunks": n, "digest": h.hexdigest()}


_MODEL_DIGESTS: dict[str, str] = {}


def model_digest(model_dir) -> str:
    """sha256 over the model's manifest and every graph file it names (once per process)."""
    path = Path(model_dir.path).resolve()
    key = str(path)
    if key in _MODEL_DIGESTS:
        return _MODEL_DIGESTS[key]
    h = hashlib.sha256()
    manifest = model_dir.manifest_path
    h.update(manifest.read_bytes())
    files = sorted({f for graphs in (model_dir.manifest.get("graphs") or {}).values()
                    for f in graphs.values()})
    cpu = model_dir.manifest.get("cpu_graphs") or {}
    if isinstance(cpu, dict):
        for graphs in cpu.values():
            if isinstance(graphs, dict):
                files = sorted(set(files) | {f for f in graphs.values() if isinstance(f, str)})
    for name in files:
        p = path / name
        if p.is_file():
            h.update(name.encode() + b"\0")
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    _MODEL_DIGESTS[key] = digest = "sha256:" + h.hexdigest()
    return digest


__all__ = ["LEDGER_NAME", "Ledger", "file_fingerprint", "model_digest", "zarr_fingerprint"]
