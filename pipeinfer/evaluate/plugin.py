"""`lm_eval --model pipeinfer` once pipeinfer is installed (pip install .): lm-eval 0.4 reads no
entry points for its models, so the installed pipeinfer_lmeval.pth (setup.py) imports this module
at interpreter start. It imports nothing itself: an import hook waits for lm-eval's model table
(lm_eval.models) to load, then adds "pipeinfer" to it as a lazy "module:Class" entry, so that lm.py
(and torch) load only when an evaluation asks for the model.
"""

from __future__ import annotations

import importlib.abc
import sys

TARGET = "pipeinfer.evaluate.lm:PipeinferLM"


def register() -> None:
    from lm_eval.api.registry import model_registry

    if "pipeinfer" not in model_registry:
        model_registry.register("pipeinfer", target=TARGET)


class _AfterModels(importlib.abc.MetaPathFinder):
    """Finds lm_eval.models as the other finders do, and registers pipeinfer once it has run."""

    def find_spec(self, name, path, target=None):
        if name != "lm_eval.models":
            return None
        spec = next((s for f in sys.meta_path if f is not self and hasattr(f, "find_spec")
                     for s in [f.find_spec(name, path, target)] if s is not None), None)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            register()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if "lm_eval.models" in sys.modules:
        register()
    elif not any(isinstance(f, _AfterModels) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterModels())


install()
