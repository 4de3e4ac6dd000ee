"""What the plan-command tests share: paths, a SmolLM2-shaped model config, a small valid plan,
``run`` (the CLI in-process, output captured) and ``write``. The ``config`` fixture is in conftest."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from moa_plan.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "spec" / "examples").glob("*.json"))
SMOLLM2_CONFIG = {
    "_name_or_path": "HuggingFaceTB/SmolLM2-135M",
    "model_type": "llama",
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
    "max_position_embeddings": 8192,
}
VALID = {
    "format_version": 1,
    "model": {"num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8},
    "sink": 2,
    "default": {"alpha": 3, "beta": 0.25},
    "layers": [{"overrides": {"1": {"alpha": -4, "beta": 1}}}, {"heads": [{"alpha": 0, "beta": 0.5}] * 4}],
}


def run(*argv: str) -> tuple[int, str, str]:
    """main(argv) in-process with stdout / stderr captured (usable inside hypothesis tests)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path
