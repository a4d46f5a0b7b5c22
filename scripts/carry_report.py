"""What RL changed in the demo's base: greedy answers on held-out problems by kind.

    python scripts/carry_report.py --base outputs/cache/sft-... --adapter outputs/run/adapter

The demo's base is taught to drop the carry (``model.sft_carry_slip``); this prints, for the
base and for the base with the run's exported adapter merged (HF transformers, an evaluation
path independent of vLLM and Megatron), the share of greedy answers that are right and that
are the slipped answer, for sums that carry, other sums, and differences. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlcore.tasks import Problem, arithmetic_problems, carry_slip_answer  # noqa: E402
from scripts.bench_heldout import merged_model  # noqa: E402


def kind(problem: Problem) -> str:
    if carry_slip_answer(problem.prompt) is not None:
        return "sums that carry"
    return "other sums" if "+" in problem.prompt else "differences"


def greedy_by_kind(model, tokenizer, problems: list[Problem]) -> dict[str, dict[str, float]]:
    import torch

    counts: dict[str, list[int]] = {}
    for problem in problems:
        ids = torch.tensor([tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        tally = counts.setdefault(kind(problem), [0, 0, 0])
        tally[0] += 1
        tally[1] += text == problem.answer
        tally[2] += text == carry_slip_answer(problem.prompt)
    return {k: {"problems": n, "right": right / n, "slipped": slipped / n}
            for k, (n, right, slipped) in sorted(counts.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="the SFT base (outputs/cache/sft-...)")
    parser.add_argument("--adapter", type=Path, required=True, help="the run's PEFT adapter (run_dir/adapter)")
    parser.add_argument("--problems", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0, help="draws the held-out problems")
    parser.add_argument("--difficulty", type=int, default=2)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    problems = arithmetic_problems(args.problems, seed=args.seed, split="heldout", difficulty=args.difficulty)
    report = {}
    for label, side, adapter in (("base", None, None), ("after RL", "trillora", args.adapter)):
        report[label] = greedy_by_kind(merged_model(args.base, side, adapter), tokenizer, problems)
        for k, row in report[label].items():
            print(f"{label:>8} | {k:<15} | {row['problems']:>3} problems | right {row['right']:.3f} | "
                  f"slipped {row['slipped']:.3f}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
