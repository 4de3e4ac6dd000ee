"""moa_plan.evals: quality of plans (``quality/``), lm-eval glue (``lm_eval/``), GPU benchmarks
(``bench/``), the ``moa-plan eval`` command (``cli``) and the demo."""
