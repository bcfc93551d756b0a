"""Tiny, offline pieces for tests, studies and benchmarks of the TRL hook: nothing is downloaded.

:func:`char_tokenizer` builds a character-level ``PreTrainedTokenizerFast`` in-process (a
``tokenizers`` WordLevel model over a fixed alphabet); :func:`tiny_gpt2` a randomly initialised
GPT-2 from a config sized by its arguments. The arithmetic task (:func:`addition_pairs`,
:func:`addition_reward`, :func:`pretrain_addition`) gives a programmatic reward: prompt ``"a+b="``,
reward 1 when the completion is exactly ``a + b``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from rlattr.errors import RlattrError

PAD, EOS = "<pad>", "<eos>"
DEFAULT_ALPHABET = "0123456789+-*=?:;,. abcdefghijklmnopqrstuvwxyz"


def char_tokenizer(alphabet: Iterable[str] = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one id per character of ``alphabet``, plus ``<pad>`` (0), ``<eos>`` (1).

    Characters outside the alphabet map to ``<pad>``; decoding concatenates without spaces.
    """
    chars = list(dict.fromkeys(alphabet))
    if not chars or any(len(c) != 1 for c in chars):
        raise RlattrError(f"alphabet: expected single characters, got {chars[:5]!r}")
    vocab = {PAD: 0, EOS: 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=PAD)
    fast.padding_side = "left"
    return fast


def tiny_gpt2(
    tokenizer: PreTrainedTokenizerFast,
    *,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
    n_positions: int = 64,
    attn_implementation: str = "eager",
    seed: int = 0,
) -> GPT2LMHeadModel:
    """A GPT-2 with random weights (dropout off), sized for CPU tests; ``seed`` fixes the weights."""
    import torch

    cfg = GPT2Config(  # type: ignore[call-arg]
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


_ANSWER_WIDTH = 4  # at most 3 answer digits and <eos>, left-padded: the last 4 positions


def addition_pairs(max_operand: int, *, held_out: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Prompts ``"a+b="`` for ``0 <= a, b <= max_operand``, split into (train, held-out) at random."""
    import random

    prompts = [f"{a}+{b}=" for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(seed).shuffle(prompts)
    n_out = max(1, int(len(prompts) * held_out))
    return prompts[n_out:], prompts[:n_out]


def addition_answer(prompt: str) -> str:
    a, b = prompt.rstrip("=").split("+")
    return str(int(a) + int(b))


def addition_reward(prompts: list[str], completions: list[str], **kwargs: object) -> list[float]:
    """TRL reward function: 1.0 when the completion (EOS stripped) is exactly the sum, else 0.0."""
    return [float(c.strip() == addition_answer(p)) for p, c in zip(prompts, completions, strict=True)]


def addition_closeness_reward(prompts: list[str], completions: list[str], **kwargs: object) -> list[float]:
    """TRL reward function, dense: ``max(0, 1 - |c - (a + b)| / 5)`` for a numeric completion c, else 0."""
    out = []
    for p, c in zip(prompts, completions, strict=True):
        c = c.strip()
        out.append(max(0.0, 1.0 - abs(int(c) - int(addition_answer(p))) / 5.0) if c.isdigit() else 0.0)
    return out


def pretrain_addition(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    *,
    correct_frac: float = 0.4,
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Supervised pretraining on ``"a+b=c<eos>"`` where c is right with probability ``correct_frac``.

    Wrong answers are uniform over ``0 .. 2 * max operand``, so the pretrained policy samples the
    right answer well below always: room for RL to sharpen it. Returns the loss per step.
    """
    import random

    rng = random.Random(seed)
    top = max(int(a) for p in prompts for a in p.rstrip("=").split("+")) * 2

    def texts() -> list[str]:
        out = []
        for p in rng.choices(prompts, k=batch_size):
            answer = addition_answer(p) if rng.random() < correct_frac else str(rng.randint(0, top))
            out.append(p + answer + tokenizer.eos_token)
        return out

    return fit_continuations(model, tokenizer, texts, tail=_ANSWER_WIDTH, steps=steps, lr=lr)


def fit_continuations(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    sample_texts: Callable[[], list[str]],
    *,
    tail: int,
    steps: int,
    lr: float,
) -> list[float]:
    """AdamW language-model training on batches from ``sample_texts()``, the loss on each text's last
    ``tail`` tokens only (padding excluded). Returns the loss per step."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        enc = tokenizer(sample_texts(), return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        labels[:, :-tail] = -100  # learn the continuation only (the prompts are uniform noise)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


__all__ = [
    "DEFAULT_ALPHABET",
    "EOS",
    "fit_continuations",
    "PAD",
    "addition_answer",
    "addition_closeness_reward",
    "addition_pairs",
    "addition_reward",
    "char_tokenizer",
    "pretrain_addition",
    "tiny_gpt2",
]
