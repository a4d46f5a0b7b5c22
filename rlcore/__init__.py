"""rlcore: the algorithm library of trillora (pure torch).

Advantages, policy losses, KL penalties, rollout correction (truncated importance sampling
between the rollout and training backends), rewards, DAPO helpers, the rest of the GRPO
family (GFPO, GVPO, RiskPO) and tasks. It never imports Ray, vLLM or Megatron, so every
formula can be read and tested alone.
"""
