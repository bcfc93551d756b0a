"""Tiny, offline pieces for tests, studies and benchmarks of the TRL hook: nothing is downloaded.

:func:`char_tokenizer` builds a character-level ``PreTrainedTokenizerFast`` in-process (a
``tokenizers`` WordLevel model over a fixed alphabet); :func:`tiny_gpt2` a randomly initialised
GPT-2 from a config sized by its arguments.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

PAD, EOS = "<pad>", "<eos>"
DEFAULT_ALPHABET = "0123456789+-*=?:;,. abcdefghijklmnopqrstuvwxyz"


def char_tokenizer(alphabet: Iterable[str] = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one id per character of ``alphabet``, plus ``<pad>`` (0), ``<eos>`` (1).

    Characters outside the alphabet map to ``<pad>``; decoding concatenates without spaces.
    """
    chars = list(dict.fromkeys(alphabet))
    if not chars or any(len(c) != 1 for c in chars):
        raise ValueError(f"alphabet: expected single characters, got {chars[:5]!r}")
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

    cfg = GPT2Config(
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


__all__ = ["DEFAULT_ALPHABET", "EOS", "PAD", "char_tokenizer", "tiny_gpt2"]
