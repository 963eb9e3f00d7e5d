"""Methods that produce a training set: baselines and distillation, all behind one registry.

Every module of this package that defines a method registers it on import; importing the
package imports them all, so adding a method is adding a module.
"""

import importlib
import pkgutil

from medistill.methods.base import (
    MethodSpec,
    RunContext,
    check_ipc,
    distill,
    get_method,
    list_methods,
    make_config,
    new_set,
    register_method,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "MethodSpec",
    "RunContext",
    "check_ipc",
    "distill",
    "get_method",
    "list_methods",
    "make_config",
    "new_set",
    "register_method",
]
