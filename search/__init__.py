"""moa_plan.search: calibration data, attention-influence profiling and the plan optimiser."""
