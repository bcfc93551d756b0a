"""The two tasks of ``experiments/rlhf_detox.py``: a detoxification toy and corrupted addition rewards.

Detox toy. Texts are strings over a fixed alphabet: neutral letters ``a..j``, "charged" letters ``x y z``
and two context markers. A prompt is a marker (``m``: the text is about a person; ``n``: it is not)
and three neutral letters; a completion is :data:`COMPLETION_LEN` letters. The programmatic rule
(:func:`is_toxic`) is context-dependent: after ``m`` any charged letter is toxic, after ``n`` only two
adjacent charged letters are. The pretraining corpus (:func:`sample_completion`) is a Markov chain
whose charged letters come in bursts, so about half of its completions are toxic. The reward model
(:class:`RewardModel`) is a small MLP over the marker and the completion's letter counts, trained on
noisy labels: it cannot see adjacency, so like a real classifier it is imperfect.

Corruption. The addition task of :mod:`rlattr.testing.tiny_lm`; a fixed subset of the training
prompts is rewarded for a fixed wrong answer (:func:`corrupted_answer`) instead of the sum.
"""

from __future__ import annotations

import random

import torch
from torch import nn
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from rlattr.testing.tiny_lm import addition_answer, fit_continuations

NEUTRAL = "abcdefghij"
CHARGED = "xyz"
MARKERS = "mn"  # m: about a person (any charged letter is toxic); n: not (two adjacent ones are)
ALPHABET = NEUTRAL + CHARGED + MARKERS
COMPLETION_LEN = 6
_P_CHARGED = {"m": 0.22, "n": 0.22}  # chance that a letter after a neutral one is charged
_P_BURST = 0.45  # chance that a letter after a charged one is charged again


def detox_prompts(n: int, *, seed: int) -> list[str]:
    """``n`` distinct prompts: a marker and three neutral letters, half of each marker."""
    rng = random.Random(seed)
    every = [m + a + b + c for m in MARKERS for a in NEUTRAL for b in NEUTRAL for c in NEUTRAL]
    rng.shuffle(every)
    return every[:n]


def is_toxic(prompt: str, completion: str) -> bool:
    """The ground-truth rule: a charged letter after an ``m`` prompt, or two adjacent charged letters."""
    charged = [ch in CHARGED for ch in completion]
    if prompt[:1] == "m" and any(charged):
        return True
    return any(a and b for a, b in zip(charged, charged[1:], strict=False))


def sample_completion(prompt: str, rng: random.Random) -> str:
    """One corpus continuation of ``prompt`` (the Markov chain of the module docstring)."""
    out, prev_charged = [], False
    for _ in range(COMPLETION_LEN):
        p = _P_BURST if prev_charged else _P_CHARGED[prompt[0]]
        prev_charged = rng.random() < p
        out.append(rng.choice(CHARGED if prev_charged else NEUTRAL))
    return "".join(out)


def pretrain_detox(
    model: GPT2LMHeadModel,
    tok: PreTrainedTokenizerFast,
    prompts: list[str],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Language-model pretraining on ``prompt + corpus continuation + <eos>`` (loss on the continuation)."""
    rng = random.Random(seed)

    def texts() -> list[str]:
        return [p + sample_completion(p, rng) + tok.eos_token for p in rng.choices(prompts, k=batch_size)]

    # every text has one length, so the tail is exactly the completion and its <eos>
    return fit_continuations(model, tok, texts, tail=COMPLETION_LEN + 1, steps=steps, lr=lr)


class RewardModel(nn.Module):
    """A toxicity classifier: ``logit(toxic)`` from the prompt's marker and the completion's letter counts.

    Features ``float[n, 2 + len(ALPHABET)]``: one-hot marker, then how often each letter occurs in the
    completion. Order is lost, so the adjacency half of the rule is only guessed from the counts.
    """

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + len(ALPHABET), hidden), nn.Tanh(), nn.Linear(hidden, 1))

    @staticmethod
    def features(prompts: list[str], completions: list[str]) -> torch.Tensor:
        x = torch.zeros(len(prompts), 2 + len(ALPHABET))
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            x[i, MARKERS.index(p[0])] = 1.0
            for ch in c:
                if ch in ALPHABET:
                    x[i, 2 + ALPHABET.index(ch)] += 1.0 / COMPLETION_LEN
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    @torch.no_grad()
    def reward(self, prompts: list[str], completions: list[str]) -> list[float]:
        """``1 - P(toxic)`` per completion: higher is cleaner."""
        return (1.0 - torch.sigmoid(self(self.features(prompts, completions)))).tolist()


def labelled_texts(prompts: list[str], n: int, *, seed: int) -> tuple[list[str], list[str], list[bool]]:
    """``n`` corpus samples: (prompts, completions, true toxicity labels)."""
    rng = random.Random(seed)
    ps = rng.choices(prompts, k=n)
    cs = [sample_completion(p, rng) for p in ps]
    return ps, cs, [is_toxic(p, c) for p, c in zip(ps, cs, strict=True)]


def train_reward_model(
    prompts: list[str], *, n_train: int, label_noise: float, steps: int = 400, seed: int = 0
) -> tuple[RewardModel, dict[str, float]]:
    """Fit :class:`RewardModel` on ``n_train`` samples whose labels flip with prob ``label_noise``.

    Returns the model and its accuracy against the true rule on fresh samples (overall, and on the
    ``n``-marker texts, where adjacency decides), with the toxic share of those samples.
    """
    rng = random.Random(seed + 1)
    ps, cs, ys = labelled_texts(prompts, n_train, seed=seed)
    noisy = [y != (rng.random() < label_noise) for y in ys]
    x, y = RewardModel.features(ps, cs), torch.tensor(noisy, dtype=torch.float32)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        rm = RewardModel()
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy_with_logits(rm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tp, tc, ty = labelled_texts(prompts, 4000, seed=seed + 7)
    with torch.no_grad():
        pred = (rm(RewardModel.features(tp, tc)) > 0).tolist()
    right = [a == b for a, b in zip(pred, ty, strict=True)]
    on_n = [r for r, p in zip(right, tp, strict=True) if p[0] == "n"]
    stats = {
        "accuracy": sum(right) / len(right),
        "accuracy_n_marker": sum(on_n) / max(len(on_n), 1),
        "toxic_share": sum(ty) / len(ty),
        "label_noise": label_noise,
        "n_train": n_train,
    }
    return rm, stats


def corrupted_answer(prompt: str) -> str:
    """The fixed wrong answer a corrupted prompt is rewarded for: ``(a + b + 5) mod 19`` (never the sum)."""
    return str((int(addition_answer(prompt)) + 5) % 19)


def closeness(completion: str, answer: str) -> float:
    """``max(0, 1 - |c - answer| / 5)`` for a numeric completion c, else 0 (the study's dense reward)."""
    c = completion.strip()
    return max(0.0, 1.0 - abs(int(c) - int(answer)) / 5.0) if c.isdigit() else 0.0


def corrupt_reward(corrupted: set[str]):
    """``reward(prompts, completions, trusted)``: closeness to the sum, or, on a ``corrupted`` prompt
    outside the trusted set, to :func:`corrupted_answer`."""

    def reward(prompts: list[str], completions: list[str], trusted: bool) -> list[float]:
        return [
            closeness(c, corrupted_answer(p) if p in corrupted and not trusted else addition_answer(p))
            for p, c in zip(prompts, completions, strict=True)
        ]

    return reward


__all__ = [
    "ALPHABET",
    "CHARGED",
    "COMPLETION_LEN",
    "MARKERS",
    "NEUTRAL",
    "RewardModel",
    "closeness",
    "corrupt_reward",
    "corrupted_answer",
    "detox_prompts",
    "is_toxic",
    "labelled_texts",
    "pretrain_detox",
    "sample_completion",
    "train_reward_model",
]
