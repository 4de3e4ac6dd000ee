"""Natural-language text available offline on every machine, split once into calibration and
evaluation documents.

The source is the Python reference manual that ships inside CPython (``pydoc_data.topics``):
79 sections of long technical English. Each section goes to exactly one side (every third
section, in name order, to calibration; the rest to evaluation), so a searched plan is never
judged on text it was profiled on. Nothing here is downloaded.
"""

from __future__ import annotations

PARTS = ("calibration", "evaluation")


def sections(part: str) -> list[tuple[str, str]]:
    """(title, text) of every section of one part, in a fixed order."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
    from pydoc_data.topics import topics

    out = []
    for i, key in enumerate(sorted(topics)):
        if (i % 3 == 0) == (part == "calibration"):
            text = topics[key].strip()
            title = text.splitlines()[0].strip() if text else key
            out.append((title, text))
    return out


def text(part: str) -> str:
    """One part's sections joined by blank lines."""
    return "\n\n".join(body for _, body in sections(part))
