"""Usage and cost: token sums of finished requests per key and session, priced per million.

Prefill tokens are prompt tokens (sampling, forward-only passes), sample tokens are
generated ones, train tokens those of forward_backward; time spent queued is not billed.
"""

from __future__ import annotations

from trainers.service.config import PriceConfig
from trainers.service.store import Store

KINDS = ("prefill", "sample", "train")


def cost(tokens: dict[str, int], price: PriceConfig) -> float:
    return sum(tokens[k] * getattr(price, f"{k}_per_million") for k in KINDS) / 1e6


def usage_report(store: Store, price: PriceConfig, key_id: int | None) -> dict:
    """``{"currency", "keys": {key_id: {"tokens", "cost", "sessions": {sid: {...}}}}}`` (one key
    with ``key_id``, every key without)."""
    names = {row.id: row.name for row in store.key_ids()}
    keys: dict[str, dict] = {}
    for row in store.usage(key_id):
        tokens = {k: int(getattr(row, k) or 0) for k in KINDS}
        entry = keys.setdefault(str(row.key_id), {"name": names.get(row.key_id), "requests": 0,
                                                  "tokens": dict.fromkeys(KINDS, 0), "sessions": {}})
        entry["requests"] += row.requests
        for k in KINDS:
            entry["tokens"][k] += tokens[k]
        entry["sessions"][row.session_id or "-"] = {"requests": row.requests, "tokens": tokens,
                                                    "cost": round(cost(tokens, price), 9)}
    if key_id is not None and str(key_id) not in keys:
        keys[str(key_id)] = {"name": names.get(key_id), "requests": 0, "tokens": dict.fromkeys(KINDS, 0), "sessions": {}}
    for entry in keys.values():
        entry["cost"] = round(cost(entry["tokens"], price), 9)
    return {"currency": price.currency,
            "price_per_million": {k: getattr(price, f"{k}_per_million") for k in KINDS}, "keys": keys}
