"""The run layer: every long job (calibrate, profile, optimise, retrieval, perplexity, context,
bench) is a grid of cells computed into one result file, through this module.

The result file is one JSON object::

    {"job": "retrieval", "format": 1, "settings": {...}, "fingerprint": "<16 hex>",
     "cells": {"<key>": <value>, ...}, ...}

``settings`` is everything besides the grid that decides a cell's value; ``fingerprint`` is
its hash; ``cells`` are stored in grid order, one per line; a job may add summary fields
derived from its cells. After every cell the whole file is rewritten atomically
(``files.write_atomic``), and while a run holds it the file is locked (``files.exclusive``).

One policy for every job: an existing file is resumed (its finished cells are never computed
again); a file made with other settings is refused with one line naming the first differing
setting, unless ``overwrite`` starts afresh; results of different settings are never mixed.
The grid may change between runs; a job either keeps the cells outside its grid (evaluations: a
cache of the same settings, e.g. methods run earlier) or drops them (a data set: calibration
samples, a profile, which must hold exactly what was asked for).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from moa_plan.errors import OptionError, Problems, UsageError, printable
from moa_plan.files import MAX_RESULT_BYTES, exclusive, write_atomic
from moa_plan.strict_json import read_json_limited

FORMAT = 1
HEADER = ("job", "format", "settings", "fingerprint", "cells")


def fingerprint(value: Any) -> str:
    """A short stable hash of a JSON value (key order does not matter)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _shown(value: Any) -> str:
    return printable(json.dumps(value, sort_keys=True), limit=60)


def first_difference(old: Mapping[str, Any], new: Mapping[str, Any], grows: Iterable[str] = ()) -> str | None:
    """The first setting (by name) whose stored and requested values differ, as one phrase, or
    None. A setting in ``grows`` is a mapping whose shared keys must agree (new keys may come)."""
    for name in list(new) + [k for k in old if k not in new]:
        a, b = old.get(name), new.get(name)
        if name in grows and isinstance(a, dict) and isinstance(b, dict):
            for key in b:
                if key in a and a[key] != b[key]:
                    return (
                        f"{name} {printable(str(key), limit=60)} differs ({_shown(a[key])} there, {_shown(b[key])} now)"
                    )
        elif a != b:
            return f"{name} is {_shown(a)} there, {_shown(b)} now"
    return None


class Run:
    """One job's result file, open for resuming (a context manager: it holds the file's lock)."""

    def __init__(
        self,
        path: str | os.PathLike,
        job: str,
        settings: Mapping[str, Any],
        *,
        overwrite: bool = False,
        quiet: bool = False,
        grows: Iterable[str] = (),
    ):
        self.path, self.job, self.quiet = Path(path), job, quiet
        self.settings = json.loads(json.dumps(dict(settings)))  # plain JSON values, as stored
        self.overwrite, self.grows = overwrite, tuple(grows)
        self.cells: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self._lock: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> Run:
        self._lock = exclusive(self.path)
        self._lock.__enter__()
        try:
            self._load()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._lock is not None:
            self._lock.__exit__(*exc)

    def _load(self) -> None:
        if self.overwrite or not os.path.lexists(self.path):
            return
        try:
            data = read_json_limited(self.path, MAX_RESULT_BYTES)
        except Problems as exc:
            raise UsageError(
                [(loc, f"{msg}; pass --overwrite to start afresh") for loc, msg in exc.problems], source=str(self.path)
            ) from None
        if not (
            isinstance(data, dict)
            and data.get("job") == self.job
            and data.get("format") == FORMAT
            and isinstance(data.get("settings"), dict)
            and isinstance(data.get("cells"), dict)
        ):
            raise UsageError(
                [
                    (
                        "",
                        f"not a moa-plan {self.job} result file (format {FORMAT}); pass --overwrite "
                        "to replace it, or write elsewhere",
                    )
                ],
                source=str(self.path),
            )
        diff = first_difference(data["settings"], self.settings, self.grows)
        if diff is not None:
            raise OptionError(
                [
                    (
                        str(self.path),
                        f"made with other settings: {diff}; pass --overwrite to start afresh, or write elsewhere",
                    )
                ]
            )
        self.cells = data["cells"]
        for name in self.grows:  # a growing setting keeps what earlier runs added (their cells stay valid)
            if isinstance(data["settings"].get(name), dict) and isinstance(self.settings.get(name), dict):
                self.settings[name] = {**data["settings"][name], **self.settings[name]}
        self.summary = {k: v for k, v in data.items() if k not in HEADER}

    def todo(self, keys: Iterable[str]) -> list[str]:
        """The keys of ``keys`` not computed yet, in order."""
        return [k for k in keys if k not in self.cells]

    def put(self, key: str, value: Any) -> None:
        """Store one finished cell and checkpoint the file."""
        self.cells[key] = value
        self.save()

    def put_many(self, items: Mapping[str, Any]) -> None:
        """Store cells computed together (one batch) and checkpoint once."""
        self.cells.update(items)
        self.save()

    def finish(self, keys: Iterable[str], prune: bool = True, **summary: Any) -> dict[str, Any]:
        """Put the cells of ``keys`` first, in that order, and drop the others unless ``prune`` is
        False (they stay as a cache: same settings); add summary fields; write the final file."""
        keys = list(keys)
        rest = {} if prune else {k: v for k, v in self.cells.items() if k not in set(keys)}
        self.cells = {**{k: self.cells[k] for k in keys if k in self.cells}, **rest}
        self.summary.update(summary)
        self.save()
        return self.cells

    def save(self) -> None:
        write_atomic(
            self.path,
            dumps(
                {
                    "job": self.job,
                    "format": FORMAT,
                    "settings": self.settings,
                    "fingerprint": fingerprint(self.settings),
                    "cells": self.cells,
                    **self.summary,
                }
            ),
        )

    def progress(self, total: int, desc: str, unit: str = "cell") -> Progress:
        return Progress(total, desc, quiet=self.quiet, unit=unit)


def dumps(data: Mapping[str, Any]) -> str:
    """The result file's text: top-level fields indented, each cell on one line."""
    parts = []
    for key, value in data.items():
        if key == "cells" and isinstance(value, dict) and value:
            body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, allow_nan=False)}" for k, v in value.items())
            parts.append(f' "cells": {{\n{body}\n }}')
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value, allow_nan=False)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def read_result(path: str | os.PathLike, job: str) -> dict[str, Any]:
    """A finished result file of ``job`` (settings, cells, summary), or a located UsageError."""
    data = read_json_limited(path, MAX_RESULT_BYTES)
    if not (
        isinstance(data, dict)
        and data.get("job") == job
        and data.get("format") == FORMAT
        and isinstance(data.get("settings"), dict)
        and isinstance(data.get("cells"), dict)
    ):
        raise UsageError([("", f"not a moa-plan {job} result file (format {FORMAT})")], source=str(path))
    return data


class Progress:
    """The one progress display: 'desc: done/total unit [elapsed, ETA]' on stderr, redrawn in
    place on a terminal (at most every 0.2 s), else one line every 30 s; nothing when quiet."""

    def __init__(self, total: int, desc: str, quiet: bool = False, unit: str = "cell", stream: Any = None):
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.stream = stream or sys.stderr
        self.quiet = quiet or total <= 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = self.last = time.monotonic()
        if not self.quiet:
            self._draw()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if not self.quiet and (now - self.last >= (0.2 if self.tty else 30.0) or self.done >= self.total):
            self.last = now
            self._draw()

    def _draw(self) -> None:
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        text = (
            f"{self.desc}: {self.done}/{self.total} {self.unit}s [{_clock(elapsed)} elapsed"
            f"{', ETA ' + _clock(eta) if eta is not None and self.done < self.total else ''}]"
        )
        self.stream.write(("\r" + text + "\x1b[K") if self.tty else text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self.quiet and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        self.quiet = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
