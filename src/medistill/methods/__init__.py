"""Methods that produce a training set: baselines and distillation, all behind one registry."""

from medistill.methods import full, random  # noqa: F401  (registers the methods)
from medistill.methods.registry import MethodSpec, RunContext, check_ipc, distill, get_method, list_methods, make_config, new_set, register_method

__all__ = ["MethodSpec", "RunContext", "check_ipc", "distill", "get_method", "list_methods", "make_config", "new_set", "register_method"]
