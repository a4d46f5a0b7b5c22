"""The service benchmark's RL step data: rewards, group-centred advantages and the alignment of
importance_sampling datums (the prompt carries no loss; sampled tokens their log-probs)."""

from __future__ import annotations

import pytest

from scripts.service_rl_step import Problem, centred, problems, reward, rl_datum, step_data


class CharTokenizer:
    """One token per character: enough to check rendering and decoding."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, tokens: list[int]) -> str:
        return "".join(chr(t) for t in tokens)


def test_reward_is_the_last_integer():
    problem = Problem(12, 30, ())
    assert reward("12 + 30 = 42", problem) == 1.0
    assert reward("42, no: 41", problem) == 0.0
    assert reward("4,2", problem) == 1.0  # thousands separators dropped, as the recipe does
    assert reward("no number", problem) == 0.0


def test_datum_alignment():
    d = rl_datum((1, 2, 3), [7, 8], [-0.5, -0.25], 0.75)
    assert d.tokens == [1, 2, 3, 7] and d.target_tokens == [2, 3, 7, 8]
    assert d.logprobs == [0.0, 0.0, -0.5, -0.25] and d.advantages == [0.0, 0.0, 0.75, 0.75]


def test_step_data_centres_rewards_within_each_group():
    tok = CharTokenizer()
    batch = problems(tok, step=3, count=2)
    assert batch == problems(tok, step=3, count=2) and batch != problems(tok, step=4, count=2)
    assert tok.decode(list(batch[0].prompt)).endswith(f"What is {batch[0].x} + {batch[0].y}?<|im_end|>\n"
                                                      "<|im_start|>assistant\n")
    right = [str(p.x + p.y) for p in batch]
    groups = [[(tok.encode(right[0]), [-1.0] * len(right[0])), (tok.encode("x"), [-2.0])],
              [(tok.encode("x"), [-2.0]), (tok.encode("y"), [-3.0])]]
    data, mean_reward = step_data(tok, batch, groups)
    assert mean_reward == 0.25
    assert [d.advantages[-1] for d in data] == [0.5, -0.5, 0.0, 0.0]
    assert centred([1.0, 0.0, 0.0, 1.0]) == [0.5, -0.5, -0.5, 0.5]
    with pytest.raises(ValueError):
        step_data(tok, batch, groups[:1])
