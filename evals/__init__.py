"""moa_plan.evals: lm-eval model, LongEval-style retrieval, effective context and benchmarks."""
