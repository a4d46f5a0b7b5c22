"""rollout: the vLLM rollout fleet of trillora.

- ``config``: typed, validated EngineConfig / SamplingConfig / RolloutConfig;
- ``engine``: one vLLM engine in one Ray actor (sampling with log-probs, weight loading);
- ``worker_extension``: the in-place weight reload every vLLM worker runs;
- ``fleet``: engines behind one object (sharding, bounded waits, restarts);
- ``sync``: weight sync from the training fleet, merged weights or a LoRA adapter;
- ``samples`` / ``batching``: what generation returns, packed into the training layout;
- ``seeding``: per-prompt seeds that make rollouts reproducible;
- ``mismatch``: rollout vs training log-prob mismatch metrics;
- ``reference``: a transformers model standing in for the trainer (tests, benchmark).

It never imports ``parallel`` (trainers -> rollout, trainers -> parallel -> rlcore).
"""
