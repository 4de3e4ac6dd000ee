"""lm-eval glue: the `moa` model (``model``), its registration and task folder (``plugin``), the
data of the moa_* tasks (``task_data``, ``tasks/``) and the .pth hook source that registers both
(``_pth_hook.py``, read by setup.py)."""
