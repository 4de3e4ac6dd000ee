"""A small seeded run of the hostile-input harness (tests/fuzz_cli.py) over every command that
reads a plan; the nightly-size run is ``python tests/fuzz_cli.py --cases 2000 --seed 1``."""

from __future__ import annotations

import os

import fuzz_cli


def test_hostile_plans_never_trace_back_hang_or_go_unnamed(monkeypatch):
    # a hang is unbounded (a FIFO read waits forever): a generous bound keeps a loaded CI machine
    # from counting the largest allowed plan as one; the nightly run keeps the 10 s
    monkeypatch.setattr(fuzz_cli, "HANG_SECONDS", 120)
    cases = int(os.environ.get("MOA_FUZZ_EXAMPLES", "24"))
    tallies = fuzz_cli.run(cases, seed=15, heavy_every=4)
    failures = [line for t in tallies.values() for line in t.failures]
    assert not failures, "\n".join(failures[:20])
    assert {
        "validate",
        "show",
        "show --expanded",
        "density",
        "export-moa",
        "import-moa",
        "load_model",
        "lm-eval moa",
        "bad options",
    } <= set(tallies)
    assert tallies["validate"].ok and tallies["validate"].refused  # the cases reach both outcomes
    assert tallies["bad options"].runs > 20
