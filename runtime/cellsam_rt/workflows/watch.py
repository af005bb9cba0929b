"""Watch a folder (or a growing OME-Zarr plate) and hand each image to the batch engine once it is
completely written.

Complete means: a file's size and mtime are the same over two polls and it parses (it is read
once); a zarr field's metadata is present (plate -> well -> field -> multiscales -> array) and
its chunk listing is the same over two polls. Each image is handed over at most once per session;
across restarts the run's ledger skips finished ones. Polling always runs (network shares deliver
no events); watchdog events, when available, only wake the poll loop early.
"""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from cellsam_rt.io import ngff
from cellsam_rt.workflows.batch import RunTarget, WorkItem, file_item
from cellsam_rt.workflows.ledger import zarr_fingerprint

# An image that stays unreadable although it no longer changes is handed over after this many
# seconds (so the run reports the error once) instead of being waited for forever.
UNREADABLE_SECONDS = 30.0


class FolderWatcher:
    """Yields WorkItems for images that appear in `folder` (files and zarr fields)."""

    def __init__(self, folder: "str | Path", *, poll: float = 1.0, use_events: bool = True,
                 level: int = 0, stop: threading.Event | None = None,
                 readable: Callable[[Path], bool] | None = None):
        self.folder = Path(folder)
        self.poll = float(poll)
        self.level = level
        self.stop = stop or threading.Event()
        self.wake = threading.Event()
        self.readable = readable or _file_readable
        self._last: dict[str, tuple] = {}      # key -> state at the previous poll
        self._bad: dict[str, float] = {}       # key -> when first seen stable but unreadable
        self.seen: set[str] = set()            # keys handed over since this watcher started
        self._observer = self._start_events() if use_events else None

    # ---------------------------------------------------------------- events (optional)

    def _start_events(self):
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            return None
        wake = self.wake

        class _Wake(FileSystemEventHandler):
            def on_any_event(self, event) -> None:  # noqa: D401 - watchdog's hook
                wake.set()

        try:
            observer = Observer()
            observer.schedule(_Wake(), str(self.folder), recursive=True)
            observer.daemon = True
            observer.start()
            return observer
        except OSError:
            return None  # e.g. inotify limits: polling alone still works

    def close(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=2)
            self._observer = None

    # ---------------------------------------------------------------- polling

    def _stable(self, key: str, state: tuple) -> bool:
        """True when `state` has not changed for at least one poll interval (two polls apart)."""
        now = time.monotonic()
        before = self._last.get(key)
        if before is None or before[0] != state:
            self._last[key] = (state, now)
            return False
        return now - before[1] >= self.poll * 0.95

    def scan(self, target: RunTarget) -> tuple[list[WorkItem], bool]:
        """One poll: the items complete now, and whether anything is still changing."""
        ready: list[WorkItem] = []
        busy = False
        if ngff.is_ngff_store(self.folder):
            stores, files = [self.folder], []
        else:
            try:
                entries = sorted(p for p in self.folder.iterdir() if not p.name.startswith("."))
            except OSError:
                return [], False
            stores = [p for p in entries if ngff.is_ngff_store(p)]
            from cellsam_rt.io import is_image_file

            files = [p for p in entries if p.is_file() and is_image_file(p)]
        for path in files:
            key = str(path.resolve())
            if key in self.seen:
                continue
            try:
                st = path.stat()
            except OSError:
                continue
            if st.st_size == 0 or not self._stable(key, (st.st_size, st.st_mtime_ns)):
                self._bad.pop(key, None)
                busy = True
                continue
            if not self.readable(path):
                first = self._bad.setdefault(key, time.monotonic())
                if time.monotonic() - first < max(UNREADABLE_SECONDS, 5 * self.poll):
                    busy = True
                    continue
            self.seen.add(key)
            ready.append(file_item(path, target))
        for store in stores:
            for im in ngff.iter_images(store, level=self.level):
                if not isinstance(im, ngff.NgffImage):
                    busy = True  # a well or field announced but not written yet
                    continue
                key = f"{im.store.resolve()}/{im.path}".rstrip("/")
                if key in self.seen:
                    continue
                fp = zarr_fingerprint(im.array_dir())
                if fp["chunks"] == 0 or not self._stable(key, (fp["digest"],)):
                    busy = True
                    continue
                self.seen.add(key)
                ready.append(WorkItem(key=key, source=im))
        return ready, busy

    def items(self, target: RunTarget, exit_when_idle: float | None = None
              ) -> Iterator[WorkItem]:
        """Complete images as they appear; ends on `stop`, or after `exit_when_idle` quiet seconds."""
        last_activity = time.monotonic()
        try:
            while not self.stop.is_set():
                ready, busy = self.scan(target)
                for item in ready:
                    if self.stop.is_set():
                        return
                    yield item
                now = time.monotonic()
                if ready or busy:
                    last_activity = now
                elif exit_when_idle is not None and now - last_activity >= exit_when_idle:
                    return
                self.wake.wait(self.poll)
                self.wake.clear()
                # Events come in bursts while a file is written: scan at most 4x per interval.
                self.stop.wait(max(0.0, self.poll / 4 - (time.monotonic() - now)))
        finally:
            self.close()


def _file_readable(path: Path) -> bool:
    """True when the image file parses completely (a half-written file does not)."""
    from cellsam_rt.io import read_image

    try:
        read_image(path)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not (yet) readable"
        return False


def install_stop_handlers(stop: threading.Event, *also: threading.Event) -> Callable[[], None]:
    """SIGINT/SIGTERM set `stop` (finish the current image, then exit); returns a restorer."""
    def handler(signum, frame) -> None:  # noqa: ARG001
        stop.set()
        for ev in also:
            ev.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore


__all__ = ["FolderWatcher", "UNREADABLE_SECONDS", "install_stop_handlers"]
