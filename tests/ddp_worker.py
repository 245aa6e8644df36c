"""One process of a ``torchrun`` run in tests/test_distributed.py: ``tune`` from a JSON spec.

The spec holds TuneConfig fields and, optionally, ``interrupt``: the step after which every
process stops as if killed (leaving OUT.partial with its last checkpoint).
"""

from __future__ import annotations

import json
import sys

from edgeft.artifact import use_cache_root
from edgeft.cli.app import cache_root_from_env
from edgeft.tune import TuneConfig, tune
from edgeft.tune.distributed import leave


class Killed(Exception):
    pass


def main(spec_path: str) -> None:
    use_cache_root(cache_root_from_env())  # a process boundary, as the commands are
    spec = json.loads(open(spec_path).read())
    stop = spec.pop("interrupt", None)

    def callback(step: int) -> None:
        if step == stop:
            raise Killed(step)

    try:
        tune(TuneConfig(**spec), callback=callback)
    except Killed:
        leave(3)
    leave(0)  # as ``edgeft tune`` does under torchrun


if __name__ == "__main__":
    main(sys.argv[1])
