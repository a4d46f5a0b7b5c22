"""Many experiments on one base: a Hydra sweep run concurrently on one set of fleets.

Every configuration of a ``--multirun`` is an adapter (own optimizer, data order and seed)
on the shared Megatron base and is streamed into the shared vLLM engines when its turn comes;
experiments advance in chunks, each ending with an evaluation, and a pruning rule stops the
losers. ``hydra_plugins.trillora_sweep`` hands the jobs to ``driver.run_sweep``;
``scripts/experiments.py`` steers a running sweep through ``registry``.
"""
