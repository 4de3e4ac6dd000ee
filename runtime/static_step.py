"""Device-side state of static decode steps (one token per step), for CUDA graphs.

A captured decode step cannot take Python numbers that change per step: the position it writes,
the total length N and the plan's spans at N (span = alpha + beta * N grows with N) must live in
device tensors that the step reads and advances itself. ``StaticDecode`` holds them for the steps
that write positions ``first_n - 1 .. last_n - 1``; the spans of every N in that range are one
table [T, layers, Hq], looked up on the device. A ``MoACache`` with ``static`` set writes and attends
through these tensors (``hf.MoALayer.update``, ``hf.moa_attention_forward``).
"""

from __future__ import annotations

import torch

from moa_plan import semantics
from moa_plan.plan import Plan


def spans_table(plan: Plan, first_n: int, last_n: int) -> torch.Tensor:
    """int32 [last_n - first_n + 1, layers, Hq]: ``plan.spans(n)`` for n = first_n .. last_n."""
    if not 1 <= first_n <= last_n:
        raise ValueError(f"need 1 <= first_n <= last_n, got {first_n}, {last_n}")
    rules = plan.rules()
    keys = sorted({(r.alpha, r.beta) for layer in rules for r in layer})
    col = {k: i for i, k in enumerate(keys)}
    per_rule = torch.tensor(
        [[semantics.span(a, b, n) for a, b in keys] for n in range(first_n, last_n + 1)], dtype=torch.int32
    )  # [T, distinct rules]
    index = torch.tensor([[col[(r.alpha, r.beta)] for r in layer] for layer in rules], dtype=torch.long)
    return per_rule[:, index]


class StaticDecode:
    """Position, length and spans of the current static decode step, as device tensors.

    ``pos`` [1] (long): the position this step writes (also the ``cache_position`` of the model
    call); ``n`` (0-dim int32): the total length after the write; ``spans`` [layers, Hq]: the spans
    at ``n``. ``begin`` derives ``n`` and ``spans`` from ``pos``; ``advance`` moves ``pos`` on by one.
    Both only launch device work, so a captured step replays them.
    """

    def __init__(self, plan: Plan, first_n: int, last_n: int, device: torch.device | str):
        self.first_n, self.last_n = first_n, last_n
        self.table = spans_table(plan, first_n, last_n).to(device)
        self.pos = torch.full((1,), first_n - 1, dtype=torch.long, device=device)
        self.n = torch.full((), first_n, dtype=torch.int32, device=device)
        self.spans = self.table[0].clone()

    def begin(self) -> None:
        """Set ``n`` and ``spans`` for the position in ``pos`` (clamped into the table's range)."""
        self.n.copy_(self.pos[0] + 1)
        row = (self.pos - (self.first_n - 1)).clamp_(0, self.table.shape[0] - 1)
        self.spans.copy_(self.table.index_select(0, row)[0])

    def advance(self) -> None:
        self.pos.add_(1)

    def rewind(self, pos: int) -> None:
        """Make ``pos`` the next position to write (a fill: nothing is read back)."""
        if not self.first_n - 1 <= pos <= self.last_n - 1:
            raise ValueError(f"position {pos} outside the static steps' {self.first_n - 1}..{self.last_n - 1}")
        self.pos.fill_(pos)
