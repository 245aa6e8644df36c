"""``edgeft``'s command line: a thin layer over plain functions, a module per command.

Each command module in this package registers its commands on ``edgeft.cli.app.app``:
it parses flags, builds its stage's config and calls one function. Heavy imports
(torch, transformers, onnxruntime) happen inside the commands, so ``edgeft --help`` and
the runtime commands never load torch.
"""

from __future__ import annotations

import importlib
import pkgutil

from edgeft.cli.app import app

__all__ = ["app", "main"]

# Pipeline order for --help; any other command module follows.
_ORDER = ["models", "tune", "export", "artifact", "generate", "chat", "classify", "embed", "serve", "bench"]
_found = [m.name for m in pkgutil.iter_modules(__path__) if m.name not in ("app",)]
for _name in sorted(_found, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n)):
    importlib.import_module(f"{__name__}.{_name}")


def main() -> None:
    app()
