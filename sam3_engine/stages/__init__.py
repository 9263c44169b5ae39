"""Pipeline stages: each reads tables and writes tables, and knows nothing of scheduling.

Importing this package imports every module in it, which registers their stages
(``engine.stage.register_stage``): a new stage is a new module here, with nothing to list elsewhere.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
