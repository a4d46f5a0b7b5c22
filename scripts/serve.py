"""The Tinker-compatible training service (Hydra entry point).

    python scripts/serve.py                                   # the embedded tiny model, port 8900
    python scripts/serve.py service.port=8000 service.db_url=postgresql+psycopg://u@127.0.0.1/tinker
    python scripts/serve.py 'service.base_models={Qwen/Qwen3-30B-A3B: /ckpt/qwen3-30b-a3b}'

Prints ``trillora service listening on http://127.0.0.1:PORT`` once it accepts requests.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from rlcore.validation import ConfigError  # noqa: E402
from trainers.service.config import load_service_config, register_configs  # noqa: E402

register_configs()


@hydra.main(config_path="../configs", config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from trainers.service.server import serve

    try:
        service_cfg = load_service_config(cfg)
    except ConfigError as err:
        print(f"invalid configuration: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    serve(service_cfg)


if __name__ == "__main__":
    main()
