"""Only job: install ``moa_plan_lm_eval.pth`` next to the package (see evals/lm_eval/_pth_hook.py).

Everything else is configured in pyproject.toml. The .pth is one line that runs the hook source;
it goes to the wheel's root (site-packages) for normal installs, and into the unpacked editable
wheel for ``pip install -e .`` (setuptools points ``install_lib`` there in editable mode).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "moa_plan_lm_eval.pth"
HOOK_SOURCE = Path(__file__).resolve().parent / "evals" / "lm_eval" / "_pth_hook.py"


def pth_line() -> str:
    source = HOOK_SOURCE.read_text(encoding="utf-8")
    code = f"exec(compile({source!r}, {'moa_plan_lm_eval.pth'!r}, 'exec'), {{'__name__': 'moa_plan_lm_eval_pth'}})"
    # site.addpackage executes a line only if it starts with "import"; never let it raise.
    return f"import sys; exec({('try:' + chr(10) + ' ' + code + chr(10) + 'except Exception: pass')!r})\n"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        targets = [Path(self.build_lib) / PTH_NAME]
        if getattr(self, "editable_mode", False):
            targets.append(Path(self.get_finalized_command("install").install_lib) / PTH_NAME)
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(pth_line(), encoding="utf-8")

    def get_outputs(self, include_bytecode=1):
        return list(super().get_outputs(include_bytecode)) + [str(Path(self.build_lib) / PTH_NAME)]


setup(cmdclass={"build_py": build_py_with_pth})
