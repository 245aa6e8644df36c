"""edgeft's benchmark suite. Each ``python -m benchmarks.X`` is a process boundary, as the
commands are: the cache folder comes from ``$EDGEFT_HOME`` here (the library reads no environment)."""

from edgeft.artifact import use_cache_root
from edgeft.cli.app import cache_root_from_env

use_cache_root(cache_root_from_env())
