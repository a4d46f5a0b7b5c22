"""How an entry point ends when it refuses to start: one message line and a distinct status.

A bad configuration exits 2 (``invalid configuration: <field>=<value>: <what is allowed>``), a
run directory held by another live driver exits 3; both before any fleet starts. The single
run (``scripts/train.py``) and the sweep launcher (``hydra_plugins.trillora_sweep``) share it.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rlcore.validation import ConfigError
from trainers.run_dir import RunDirLocked

EXIT_INVALID_CONFIG = 2
EXIT_RUN_DIR_LOCKED = 3


@contextmanager
def refusals():
    try:
        yield
    except ConfigError as err:
        print(f"invalid configuration: {err}", file=sys.stderr)
        raise SystemExit(EXIT_INVALID_CONFIG) from None
    except RunDirLocked as err:
        print(f"refusing to start: {err}", file=sys.stderr)
        raise SystemExit(EXIT_RUN_DIR_LOCKED) from None
