"""One adapter file per Dassl trainer, named after it; importing this package registers them all.

Every module here registers at least one trainer adapter (``@register_adapter``) and nothing else
lives here, so importing each module in this folder fills the registry -- and imports no helper:
the wrap, the teacher glue, meta-training and the Dassl compat fixes live one folder up. Adding a
trainer is one new file here and its test (tests/test_adapters_kgcoop.py is the worked example).
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
