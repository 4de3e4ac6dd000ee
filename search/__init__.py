"""moa_plan.search: calibration data, attention-influence profiling and the plan optimiser.

Pipeline (the MoA paper's three steps: profile, optimise, select), each step a file the next one reads:

* ``calibration`` - long-range synthetic tasks / user text at token lengths, supervised by the
  dense model's own greedy answer (a run-layer JSON file with its settings; ``moa-plan calibrate``).
* ``influence`` + ``profile`` - exact attention gradients through a recomputing backward that
  accumulates the per-head influence by key offset (``moa-plan profile``).
* ``rules`` - the (alpha, beta) candidate grid; ``optimize`` - the Pyomo MILP (weighted sums,
  Pareto filter); ``select`` - held-out-length selection and the plan with provenance
  (``moa-plan optimize``); ``plots`` - Pareto front and span map PNGs.
* ``cli`` - the subcommands, including the one-shot ``moa-plan search``.
"""
