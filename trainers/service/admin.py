"""The key and usage commands of ``scripts/service_admin.py``."""

from __future__ import annotations

import argparse
import json

from rlcore.validation import ConfigError
from trainers.service.auth import KeyLimits
from trainers.service.config import load_service_config, register_configs
from trainers.service.db import make_engine
from trainers.service.metering import usage_report
from trainers.service.store import Store


def _config(overrides: list[str]):
    from trainers.config import compose_tree

    register_configs()
    return load_service_config(compose_tree(overrides, config_name="serve"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="service_admin.py", description=__doc__)
    parser.add_argument("--set", action="append", default=[], metavar="OVERRIDE",
                        help="a serve.py override, e.g. service.db_url=... (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True)
    keys = sub.add_parser("keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create")
    create.add_argument("name")
    create.add_argument("limits", nargs="*", help="NAME=INT per-key limits: max_lora_rank, max_models")
    keys.add_parser("revoke").add_argument("key")
    sub.add_parser("usage").add_argument("--key")
    args = parser.parse_args(argv)
    try:
        cfg = _config(args.set)
        store = Store(make_engine(cfg.resolved_db_url))
        if args.command == "keys" and args.action == "create":
            print(f"created key {args.name!r}; it is shown once:")
            print(store.create_key(args.name, KeyLimits.parse(args.limits).to_json()))
            return 0
        if args.command == "keys":
            if not store.revoke_key(args.key):
                print("no live key matches")
                return 1
            print("revoked")
            return 0
        key_id = None
        if args.key:
            row = store.key_row(args.key)
            if row is None:
                print("no live key matches")
                return 1
            key_id = row.id
        print(json.dumps(usage_report(store, cfg.price, key_id), sort_keys=True))
        return 0
    except ConfigError as err:
        print(f"invalid: {err}")
        return 2
