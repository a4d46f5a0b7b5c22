"""A served base with headroom on the cookbook's math_rl arithmetic: the tiny Qwen3-vocabulary
MoE fine-tuned, through the training fleet, on the recipe's own rendered prompts.

Fine-tuning with 151,936 output rows would spend nearly all its time on logits of tokens the
recipe never uses, so SFT runs on a *compact* model whose vocabulary is the ~20 tokens the
qwen3 renderer emits for these prompts and answers plus one *bucket* row that stands for all
the other ``n`` tokens: the fleet adds ``ln n`` to the bucket's logit (``logit_bias``), which
is exactly the softmax of ``n`` rows sharing the bucket's weights. *Widening* then places the
used rows at their Qwen3 ids and copies the bucket's row to every other id, so the wide model
has, token for token, the compact model's distribution: no calibration, nothing approximate.
SFT drives the bucket's share down at every position it trains, as for any unused token.

Headroom: a share ``stray_zero`` of the training answers carry a stray trailing zero (46 ->
460, a place-value slip), so the base computes the sums but writes that many of them wrong,
on every problem alike. The recipe's reward (the last integer must be the sum) teaches it
away within a few steps, and ``env/all/correct`` does not hang on which problems a batch drew
(as it does for a slip that only some sums can make, like the demo's dropped carry).
"""

from __future__ import annotations

import copy
import math
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from parallel.arch.qwen3_vocab import MODEL_VOCAB_SIZE, TOKEN_IDS, build_qwen3_tokenizer
from parallel.arch.tiny import TinyModelSpec, build_config
from trainers.sft import packed_batch, supervised_steps, write_hf_checkpoint
from trainers.training_fleet import TrainingFleet, TrainingFleetSpec

FEWSHOT = (("What is 4 + 5?", "9"),)  # tinker_cookbook ArithmeticEnv.standard_fewshot_prefix
MAX_OPERAND = 100  # the recipe draws x, y from 0..100


@dataclass(frozen=True)
class ArithmeticBaseSpec:
    """What determines the base: the compact model, the SFT schedule, the misconception."""

    model: TinyModelSpec = field(default_factory=lambda: TinyModelSpec(
        arch="qwen3_moe", hidden=128, heads=4, kv_heads=2, head_dim=32, moe_ffn=128, dense_ffn=256,
        max_positions=4096, init_std=0.02))
    steps: int = 1500
    lr: float = 3e-3
    batch_size: int = 64
    stray_zero: float = 0.5
    seed: int = 0


def render_prompt(tokenizer, x: int, y: int) -> list[int]:
    """The qwen3 renderer's generation prompt for the recipe's question, few-shot turn first."""
    turns = [*FEWSHOT, (f"What is {x} + {y}?", None)]
    text = "".join(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" + (f"{a}<|im_end|>\n" if a else "")
                   for q, a in turns)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [TOKEN_IDS["<|im_end|>"]]


def used_token_ids(tokenizer) -> list[int]:
    """Every Qwen3 id the prompts and answers can hold (all digits occur below), and the pad."""
    ids = set(render_prompt(tokenizer, 12, 34)) | set(answer_ids(tokenizer, "567890"))
    return sorted(ids | {TOKEN_IDS["<|endoftext|>"]})


def bucket_bias(used: list[int]) -> dict[int, float]:
    """The compact model's logit bias: ``ln n`` on the bucket row (compact id ``len(used)``)."""
    return {len(used): math.log(MODEL_VOCAB_SIZE - len(used))}


def training_answer(x: int, y: int, rng: random.Random, stray_zero: float) -> str:
    return f"{x + y}0" if rng.random() < stray_zero else str(x + y)


def problem_rows(tokenizer, to_compact: dict[int, int], problems: random.Random, count: int,
                 answer: Callable[[int, int], str]) -> list[tuple[list[int], list[int]]]:
    """``count`` (prompt, answer) rows in compact ids, x and y drawn from ``problems``."""
    rows = []
    for _ in range(count):
        x, y = problems.randint(0, MAX_OPERAND), problems.randint(0, MAX_OPERAND)
        rows.append(([to_compact[t] for t in render_prompt(tokenizer, x, y)],
                     [to_compact[t] for t in answer_ids(tokenizer, answer(x, y))]))
    return rows


def is_built(out: Path) -> bool:
    return (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def build_arithmetic_base(out_dir: str | Path, make_fleet: Callable[[TrainingFleetSpec], TrainingFleet],
                          parallel, backend, spec: ArithmeticBaseSpec | None = None, log=print) -> Path:
    """Writes (unless present) the widened checkpoint and Qwen3's tokenizer into ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = spec or ArithmeticBaseSpec()
    out = Path(out_dir)
    if is_built(out):
        return out
    work = out.with_name(out.name + ".build")
    tokenizer = AutoTokenizer.from_pretrained(build_qwen3_tokenizer(work / "tokenizer"))
    used = used_token_ids(tokenizer)
    to_compact = {t: i for i, t in enumerate(used)}
    compact_dir = work / "compact"
    compact_model(spec.model, used).save_pretrained(compact_dir)

    fleet = make_fleet(TrainingFleetSpec(str(compact_dir), parallel, None, 1, micro_batch_size=spec.batch_size,
                                         seed=spec.seed, train_base=True, backend=backend,
                                         logit_bias=bucket_bias(used)))
    rng = random.Random(spec.seed)
    pad = to_compact[TOKEN_IDS["<|endoftext|>"]]

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        problems = random.Random(spec.seed * 1_000_003 + step)
        return packed_batch(problem_rows(tokenizer, to_compact, problems, spec.batch_size,
                                         lambda x, y: training_answer(x, y, rng, spec.stray_zero)), pad)

    supervised_steps(fleet, batch_at, spec.steps, spec.lr, max_skipped=3, desc="SFT of the served arithmetic base")
    state = fleet.export_hf_state_dict()
    fleet.shutdown()
    write_hf_checkpoint(state, compact_dir, work / "trained")
    wide = widen(AutoModelForCausalLM.from_pretrained(work / "trained", dtype=torch.float32), used)
    tmp = out.with_name(out.name + ".tmp")
    wide.save_pretrained(tmp)
    build_qwen3_tokenizer(tmp)
    tmp.rename(out)
    shutil.rmtree(work)
    log(f"served arithmetic base: written to {out}")
    return out


def compact_model(model: TinyModelSpec, used: list[int]):
    """The random compact model: compact id i < len(used) is Qwen3 id ``used[i]``, the last
    row is the bucket of every other token."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(model.seed)
    config = build_config(model)
    config.vocab_size = len(used) + 1
    config.pad_token_id, config.bos_token_id = used.index(TOKEN_IDS["<|endoftext|>"]), None
    config.eos_token_id = used.index(TOKEN_IDS["<|im_end|>"])
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@torch.no_grad()
def widen(compact, used: list[int]):
    """The compact model with Qwen3's vocabulary: used rows at their ids, the bucket's row
    (input and output) at every other id."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(compact.config)
    config.vocab_size = MODEL_VOCAB_SIZE
    config.pad_token_id, config.eos_token_id = TOKEN_IDS["<|endoftext|>"], TOKEN_IDS["<|im_end|>"]
    wide = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ids = torch.tensor(used)
    rows = {}
    for name, compact_rows in (("model.embed_tokens.weight", compact.model.embed_tokens.weight),
                               ("lm_head.weight", compact.lm_head.weight)):
        full = compact_rows[len(used)].expand(MODEL_VOCAB_SIZE, -1).clone()
        full[ids] = compact_rows[:len(used)]
        rows[name] = full
    state = {k: v for k, v in compact.state_dict().items() if k not in rows}
    wide.load_state_dict({**state, **rows})
    return wide


def build_embedded_base(out_dir: str | Path, log=print) -> Path:
    """The service's embedded default (``config.TINY``): the arithmetic base, fine-tuned on a
    one-rank CPU training fleet on Ray (a few minutes, once per directory)."""
    from parallel.device import Backend
    from parallel.topology import ParallelConfig
    from trainers.fleet_hosts import RayHost

    out = Path(out_dir)
    if is_built(out):
        return out
    host = RayHost(1, 0, "colocated", Backend(), engine_gpus=0)
    try:
        return build_arithmetic_base(out, host.training, ParallelConfig(), Backend(), log=log)
    finally:
        host.close()


if __name__ == "__main__":  # python -m trainers.service.arithmetic_base OUT_DIR
    import sys

    build_embedded_base(sys.argv[1])
