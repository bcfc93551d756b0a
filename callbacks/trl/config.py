"""Settings of the TRL attribution hook, the TRL way: ``IIFGRPOConfig`` / ``IIFRLOOConfig``.

The two configs are TRL's ``GRPOConfig`` / ``RLOOConfig`` with the hook's fields (``attr_*``) added,
checked in ``__post_init__``, so ``TrlParser``, a YAML ``--config`` file and the command line set
them like any other training argument::

    parser = TrlParser((IIFGRPOConfig,))
    (args,) = parser.parse_args_and_config(["--output_dir", "out", "--attr_target_prompts", "1+2=", "3+1="])
    trainer = IIFGRPOTrainer(model=..., reward_funcs=..., args=args, train_dataset=...)

:class:`AttributionConfig` holds the same settings as one object; ``attribution=AttributionConfig(...)``
stays as a shortcut (and is the way to give dataset rows or a custom selection rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig, RLOOConfig

from rlattr.errors import ConfigError, RlattrError
from rlattr.rl.filtering import SelectionRule, make_rule


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RlattrError(f"{name}: got {value!r}; supported: an int >= {low}")


def _target_rows(target_prompts: object) -> list[dict[str, Any]]:
    """The held-out prompts as dataset rows; a bare string is refused (it would be split into characters)."""
    if isinstance(target_prompts, str | bytes) or not isinstance(target_prompts, Sequence):
        raise RlattrError(
            f"target_prompts: got {type(target_prompts).__name__} {target_prompts!r:.60}; supported: a list of "
            "prompts (str, or dict with a 'prompt' key), e.g. ['1+2=']"
        )
    rows = list(target_prompts)
    if not rows:
        raise RlattrError("target_prompts: got an empty list; supported: at least one held-out prompt")
    bad = [r for r in rows if not isinstance(r, str) and not (isinstance(r, dict) and "prompt" in r)]
    if bad:
        raise RlattrError(f"target_prompts: got {bad[0]!r}; supported: str, or dict with a 'prompt' key")
    return [{"prompt": r} if isinstance(r, str) else dict(r) for r in rows]


@dataclass
class AttributionConfig:
    """Settings of the TRL attribution hook.

    Args:
        target_prompts: held-out prompts for f_seq: dataset rows (dicts with a ``"prompt"`` key and
            any columns the reward functions read) or plain strings. Split evenly over processes.
        drop: drop pairs before the update (IIF); ``False`` only scores and logs them.
        p: fraction of the negative-scored pairs to drop, most negative first (1.0 = all).
        rule: a :class:`~rlattr.rl.filtering.SelectionRule` overriding ``p`` (e.g. a RandomDrop).
        min_keep: the rule keeps at least this many pairs of the whole generation batch.
        target_every: recompute f_seq's gradient every this many generation batches (1 = always).
        log_text_k: the k best and k worst pairs are logged as text (0 = none).
        log_dir: a TensorBoard folder for the score histogram and completion tables; without it they go
            to the trainer's own TensorBoard writer when ``report_to`` includes tensorboard, else nowhere.
        save: write every scored generation batch to ``{output_dir}/rlattr`` (read it with
            ``rlattr.load_run``, render it with ``rlattr report``).
    """

    target_prompts: Sequence[Any]
    drop: bool = True
    p: float = 1.0
    rule: SelectionRule | None = None
    min_keep: int = 1
    target_every: int = 1
    log_text_k: int = 3
    log_dir: str | None = None
    save: bool = True
    selection: SelectionRule = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.target_prompts = _target_rows(self.target_prompts)
        for name in ("drop", "save"):
            if not isinstance(getattr(self, name), bool):
                raise RlattrError(f"{name}: got {getattr(self, name)!r}; supported: True or False")
        if self.rule is not None and not isinstance(self.rule, SelectionRule):
            raise TypeError(f"rule: expected a SelectionRule, got {type(self.rule).__name__}")
        _check_int("target_every", self.target_every, 1)
        _check_int("min_keep", self.min_keep, 1)
        _check_int("log_text_k", self.log_text_k, 0)
        if self.log_dir is not None and not isinstance(self.log_dir, str):
            raise RlattrError(f"log_dir: got {self.log_dir!r}; supported: a folder path (str) or None")
        self.selection = self.rule or make_rule("neg-bottom", p=self.p, min_keep=self.min_keep)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (saved in the run folder's ``run.json``)."""
        return {
            "target_prompts": self.target_prompts,
            "drop": self.drop,
            "rule": self.selection.config() if self.drop else None,
            "min_keep": self.min_keep,
            "target_every": self.target_every,
            "log_text_k": self.log_text_k,
            "log_dir": self.log_dir,
            "save": self.save,
        }


def _help(text: str) -> dict[str, str]:
    return {"help": f"rlattr attribution hook: {text}"}


@dataclass
class AttributionArguments:
    """The hook's fields of :class:`IIFGRPOConfig` / :class:`IIFRLOOConfig` (``attr_*``)."""

    attr_target_prompts: list[str] | None = field(
        default=None,
        metadata=_help("held-out prompts for the f_seq target (required; several on the command line)."),
    )
    attr_drop: bool = field(
        default=True,
        metadata=_help("drop negatively scored pairs before the update (IIF); False scores only."),
    )
    attr_p: float = field(
        default=1.0,
        metadata=_help("fraction of the negative-scored pairs to drop, most negative first (1.0 = all)."),
    )
    attr_min_keep: int = field(
        default=1, metadata=_help("keep at least this many pairs of each generation batch.")
    )
    attr_target_every: int = field(
        default=1, metadata=_help("refresh grad f_seq every this many generation batches (1 = always).")
    )
    attr_log_text_k: int = field(
        default=3, metadata=_help("log the k best and k worst completions as tables (0 = none).")
    )
    attr_log_dir: str | None = field(
        default=None,
        metadata=_help(
            "TensorBoard folder for the score histogram and completion tables (default: the trainer's own "
            "TensorBoard writer when report_to includes tensorboard, else none)."
        ),
    )
    attr_save: bool = field(
        default=True, metadata=_help("save every scored generation batch under {output_dir}/rlattr.")
    )

    def _build_attribution(self) -> AttributionConfig | None:
        """The :class:`AttributionConfig` these fields describe (``None`` without target prompts)."""
        if self.attr_target_prompts is None:
            return None
        try:
            return AttributionConfig(
                target_prompts=self.attr_target_prompts,
                drop=self.attr_drop,
                p=self.attr_p,
                min_keep=self.attr_min_keep,
                target_every=self.attr_target_every,
                log_text_k=self.attr_log_text_k,
                log_dir=self.attr_log_dir,
                save=self.attr_save,
            )
        except RlattrError as err:
            raise ConfigError(f"attr_{err}") from err


@dataclass
class IIFGRPOConfig(GRPOConfig, AttributionArguments):
    """``trl.GRPOConfig`` plus the attribution hook's ``attr_*`` fields (see :class:`AttributionConfig`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.attribution = self._build_attribution()


@dataclass
class IIFRLOOConfig(RLOOConfig, AttributionArguments):
    """``trl.RLOOConfig`` plus the attribution hook's ``attr_*`` fields (see :class:`AttributionConfig`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.attribution = self._build_attribution()


def resolve_attribution(args: object, attribution: object) -> AttributionConfig:
    """The hook's settings: the ``attribution=`` shortcut, or the ``attr_*`` fields of ``args``."""
    from_args = getattr(args, "attribution", None) if isinstance(args, AttributionArguments) else None
    if attribution is not None and not isinstance(attribution, AttributionConfig):
        raise TypeError(f"attribution: expected an AttributionConfig, got {type(attribution).__name__}")
    if attribution is not None and from_args is not None:
        raise ConfigError(
            "attribution: got both attribution= and args.attr_target_prompts; supported: one of the two"
        )
    found = attribution if attribution is not None else from_args
    if not isinstance(found, AttributionConfig):
        raise TypeError(
            "attribution: expected an AttributionConfig, got None; supported: attribution=AttributionConfig(...) "
            "or args=IIFGRPOConfig(..., attr_target_prompts=[...]) (IIFRLOOConfig for RLOO)"
        )
    return found


__all__ = [
    "AttributionArguments",
    "AttributionConfig",
    "IIFGRPOConfig",
    "IIFRLOOConfig",
    "resolve_attribution",
]
