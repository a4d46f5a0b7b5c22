"""Per-prompt sampling seeds that make a rollout reproducible, whatever the sharding.

A trainer seeds each step and prompt so that a resumed run draws the same samples. Two
details of vLLM make a raw seed unsafe to pass through:
- for ``n > 1`` vLLM seeds completion j of a request with ``seed + j``, so prompts seeded
  s and s + 1 would share n - 1 of their random streams (correlated GRPO groups);
- sampling with a per-request seed is independent of the batch and engine the request
  lands in, so seeds must belong to prompts, not to engines or positions within a shard.
Each prompt seed is therefore hashed to a 62-bit vLLM seed (62 bits leave room for the
``+ j``), and a base seed is combined with the prompt's index in the whole call.
"""

from __future__ import annotations

import hashlib

_SEED_BITS = 62


def spread_seed(*parts: int) -> int:
    """A well-mixed seed in [0, 2**62) from integers (blake2b of their decimal form)."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - _SEED_BITS)


def prompt_seeds(count: int, base_seed: int | None, seeds: list[int] | None) -> list[int | None]:
    """The vLLM seed of each of ``count`` prompts; None where sampling is unseeded.

    ``seeds`` (one per prompt, chosen by the caller) win over ``base_seed``, from which
    prompt i gets ``spread_seed(base_seed, i)``.
    """
    if seeds is not None:
        if len(seeds) != count:
            raise ValueError(f"got {len(seeds)} seeds for {count} prompts")
        return [spread_seed(seed) for seed in seeds]
    if base_seed is None:
        return [None] * count
    return [spread_seed(base_seed, i) for i in range(count)]
