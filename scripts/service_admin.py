"""Administers the service's API keys and reads usage, straight from its database.

    python scripts/service_admin.py keys create NAME [max_lora_rank=8 max_models=4]   # key last
    python scripts/service_admin.py keys revoke KEY
    python scripts/service_admin.py usage [--key KEY]                                # JSON last

Takes the same overrides as scripts/serve.py to find the database
(``--set service.db_url=...`` or ``--set service.state_dir=...``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.service.admin import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
