"""The TRL side of ``scripts/bench_vs_trl.py``: TRL's GRPOTrainer with PEFT LoRA.

Runs in the benchmark's own venv (``.venv-bench``, made by ``bench_vs_trl.py --setup``),
never in trillora's, and takes only ``rlcore`` (torch and the standard library) from this
repository: the same arithmetic prompts and the same reward function. Everything else comes
from the settings file the benchmark writes from trillora's composed config; ``grpo_config``
is where each trillora setting meets its TRL field.

One trillora step (sample ``group`` completions of each of the step's prompts, then
``ppo_epochs`` passes over mini-batches of ``mini_batch_prompts`` prompts) is, in TRL,
``steps_per_generation`` x ``num_iterations`` optimizer steps on one generation batch; the
lockstep wraps exactly those, from the first one's start to the last one's end.

    .venv-bench/bin/python scripts/bench_trl_worker.py --settings S.json --channel R,W
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from rlcore.rewards import math_reward  # noqa: E402
from scripts.bench_lockstep import Lockstep  # noqa: E402

# Every attention projection, and the routed experts' fused weights (transformers' Qwen3-MoE
# keeps them as 3-d parameters, which PEFT adapts per expert through target_parameters).
ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def optimizer_steps_per_step(s: dict) -> int:
    return s["prompts_per_step"] // s["mini_batch_prompts"] * s["ppo_epochs"]


def grpo_config(s: dict, out_dir: Path):
    """GRPOConfig doing trillora's step: the same sizes, sampling, loss, clip and AdamW."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(out_dir), report_to="none", save_strategy="no", disable_tqdm=True, seed=s["seed"],
        use_cpu=True, bf16=False, dataloader_num_workers=0,
        gradient_checkpointing=False,  # TRL's default recomputes activations; trillora does not
        logging_steps=optimizer_steps_per_step(s),  # once a step, after its last optimizer step
        max_steps=s["steps"] * optimizer_steps_per_step(s),
        # Step sizes: a generation batch is the step's prompts (in trillora's order) x group; it
        # is split into mini-batches of mini_batch_prompts prompts' rows, passed over ppo_epochs times.
        num_generations=s["group"], shuffle_dataset=False,
        per_device_train_batch_size=s["mini_batch_prompts"] * s["group"], gradient_accumulation_steps=1,
        steps_per_generation=s["prompts_per_step"] // s["mini_batch_prompts"], num_iterations=s["ppo_epochs"],
        max_completion_length=s["max_tokens"], temperature=s["temperature"], top_p=1.0, top_k=0,
        # Loss: PPO clip, token mean over the mini-batch (TRL's default "dapo" divides by the
        # generation batch's mean tokens per mini-batch instead), group-std advantages.
        loss_type="bnpo", epsilon=s["clip_low"], epsilon_high=s["clip_high"], beta=0.0,
        scale_rewards="group",
        router_aux_loss_coef=0.0,  # TRL adds the MoE load-balancing loss by default; trillora's RL loss has none
        learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        adam_beta1=s["betas"][0], adam_beta2=s["betas"][1], adam_epsilon=1e-8, weight_decay=s["weight_decay"],
        max_grad_norm=s["grad_clip"],
    )


def lora_config(s: dict):
    from peft import LoraConfig

    return LoraConfig(r=s["lora_rank"], lora_alpha=s["lora_alpha"], lora_dropout=0.0,
                      target_modules=ATTENTION_MODULES, target_parameters=EXPERT_PARAMETERS)


class StepTokens:
    """The reward function; it also counts the step's tokens (prompt + completion, EOS
    included) and its mean reward, for the lockstep's report."""

    __name__ = "math_reward"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens, self.reward_mean = 0, 0.0

    def __call__(self, prompts, completions, completion_ids, answer, **_) -> list[float]:
        rewards = [math_reward(c, a) for c, a in zip(completions, answer)]
        prompt_tokens = sum(len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
        self.tokens = prompt_tokens + sum(len(ids) for ids in completion_ids)
        self.reward_mean = sum(rewards) / len(rewards)
        return rewards


class LockstepCallback(TrainerCallback):
    """Says ready before the first optimizer step (the trainer fully set up); waits for ``go``
    before a step's first optimizer step; after its last, saves the adapter (outside the
    timed span) and reports the step."""

    def __init__(self, lockstep: Lockstep, per_step: int, reward: StepTokens, adapters: Path):
        self.lockstep, self.per_step, self.reward, self.adapters = lockstep, per_step, reward, adapters

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            self.lockstep.send("ready", trainable_parameters=trainable, threads=torch.get_num_threads(),
                               pids={"trainer": os.getpid()})
        if state.global_step % self.per_step == 0:
            self.lockstep.begin(state.global_step // self.per_step + 1)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.per_step == 0:
            seconds = self.lockstep.elapsed()
            step = state.global_step // self.per_step
            model.save_pretrained(str(self.adapters / f"step-{step}"))
            self.lockstep.send("done", step=step, seconds=seconds, tokens=self.reward.tokens,
                               reward_mean=self.reward.reward_mean)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", required=True)
    parser.add_argument("--channel", required=True, help="R,W: the lockstep's pipe descriptors")
    args = parser.parse_args()
    s = json.loads(Path(args.settings).read_text())
    lockstep = Lockstep(args.channel)
    torch.set_num_threads(s["threads"])

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    out = Path(s["out_dir"]) / "trl"
    tokenizer = AutoTokenizer.from_pretrained(s["model_dir"])
    rows = [{"prompt": prompt, "answer": answer} for step in s["problems"] for prompt, answer in step]
    reward = StepTokens(tokenizer)
    callback = LockstepCallback(lockstep, optimizer_steps_per_step(s), reward, out / "adapters")
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(s["model_dir"], dtype=torch.float32), reward_funcs=[reward],
        args=grpo_config(s, out / "trainer"), train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        peft_config=lora_config(s), callbacks=[callback])
    trainer.train()


if __name__ == "__main__":
    main()
