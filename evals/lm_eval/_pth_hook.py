"""Source of ``moa_plan_lm_eval.pth``: makes ``lm_eval --model moa`` work with no user action.

lm-eval (0.4.x) has no plugin entry points for models, and its registry imports the built-in
models only while the registry is empty, so registering at our own import time is not enough and
registering too early would hide the built-in models. Instead, ``setup.py`` embeds this file in a
one-line ``.pth`` (run by ``site`` at interpreter start). It only adds a meta-path finder: nothing
is imported until ``lm_eval.models`` (the module that fills lm-eval's model registry) or
``lm_eval.tasks.manager`` is imported; right after either module has run, the matching function of
``moa_plan.evals.lm_eval.plugin`` registers the ``moa`` model (lazily, by import path) or adds our
task folder to the TaskManager. The file must stay importable on its own (stdlib only) and must
never raise: a broken hook may not break the interpreter.
"""

import sys


class _MoaPlanLmEvalHook:
    """Meta-path finder that runs moa_plan's lm-eval registration after selected lm_eval modules load."""

    moa_plan_hook = 1
    targets = {"lm_eval.models": "on_models_module", "lm_eval.tasks.manager": "on_task_manager_module"}

    def find_spec(self, fullname, path=None, target=None):
        callback = self.targets.get(fullname)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or getattr(finder, "moa_plan_hook", None) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        spec.loader = _PostExecLoader(loader, callback)
        return spec


class _PostExecLoader:
    """Wraps a module's loader: executes the module, restores the real loader, then calls back."""

    def __init__(self, loader, callback):
        self.loader = loader
        self.callback = callback

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        spec = getattr(module, "__spec__", None)
        if spec is not None:
            spec.loader = self.loader
        module.__loader__ = self.loader
        self.loader.exec_module(module)
        try:
            from moa_plan.evals.lm_eval import plugin as lm_eval_plugin

            getattr(lm_eval_plugin, self.callback)(module)
        except Exception as exc:  # never break lm_eval because of our hook
            print(f"moa-plan: lm-eval hook failed ({type(exc).__name__}: {exc})", file=sys.stderr)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def install():
    """Put the finder first on sys.meta_path (once per interpreter)."""
    if not any(getattr(f, "moa_plan_hook", None) for f in sys.meta_path):
        sys.meta_path.insert(0, _MoaPlanLmEvalHook())


install()
