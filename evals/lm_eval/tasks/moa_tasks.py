"""Functions referenced by the moa_* task YAMLs (implemented in moa_plan.evals.lm_eval.task_data)."""

from moa_plan.evals.lm_eval.task_data import lines_dataset, passkey_dataset, process_results

__all__ = ["lines_dataset", "passkey_dataset", "process_results"]
