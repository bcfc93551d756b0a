"""Environments, models and per-round evaluation for the IIF sample-efficiency study.

Used by ``experiments/iif_sample_efficiency.py``; one (method, seed) run is :func:`run_one`.
Methods: ``ppo`` (standard SB3 PPO), ``iif`` (IIFCallback, neg-bottom p), ``random``
(IIFCallback with a random drop of as many records as neg-bottom would drop), and the variants
beyond the paper: ``iif-val`` (neg-bottom p scored against ``iif.validation_steps`` fresh
transitions from a separate env, ``score_on="validation"``; ``iif-val-<n>`` the same with ``n``
fresh transitions), ``iif-adaptive`` (``drop="adaptive"``
with ``iif.f``, default 0.5), ``iif-adaptive-<f>`` (the same at the fraction ``f`` named in the
arm, so that arms at different f keep separate run files), ``iif-epoch`` (neg-bottom p,
re-scored at every epoch, applied to what the last epoch kept: the drops compound) and
``iif-epoch-fresh`` (neg-bottom p applied at every epoch to all the round's records, re-scored at
the current parameters: no compounding), ``iif-refill`` (neg-bottom p, the kept records resampled
back to the round's size so that PPO takes as many minibatch steps as unfiltered,
``weighting="refill"``) and ``iif-soft`` (neg-bottom p's dropped records down-weighted in
proportion to their score instead of dropped, ``weighting="soft"``). ``iif-adaptive-<f>-refill``
is the adaptive arm with ``weighting="refill"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs
from torch import nn

from rlattr.callbacks.sb3.iif import IIFCallback

METHODS = (
    "ppo",
    "iif",
    "random",
    "iif-val",
    "iif-adaptive",
    "iif-epoch",
    "iif-epoch-fresh",
    "iif-refill",
    "iif-soft",
)
ADAPTIVE = "iif-adaptive-"
VALIDATION = "iif-val-"
REFILL = "-refill"
ARM_FORMS = f"{METHODS} or '{ADAPTIVE}<f>[{REFILL}]' (0 < f <= 1) or '{VALIDATION}<steps>' (steps >= 1)"


def weighting(method: str) -> str:
    """The IIFCallback ``weighting`` of a study arm: ``"refill"`` for ``iif-refill`` and the
    ``iif-adaptive-<f>-refill`` arms, ``"soft"`` for ``iif-soft``, else the paper's ``"drop"``."""
    if method == "iif-refill" or (method.startswith(ADAPTIVE) and method.endswith(REFILL)):
        return "refill"
    return "soft" if method == "iif-soft" else "drop"


OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


class MiniGridCNN(BaseFeaturesExtractor):
    """The paper's MiniGrid network: conv 16 (3x3), conv 32 (3x3), then a 64-unit linear layer.

    Input ``Tensor[B, 3, 7, 7]`` (SB3 transposes the 7x7x3 symbolic image channel-first); the cell
    codes (object, colour, state; all <= 10) are divided by ``scale`` (255 as SB3's CnnPolicy does,
    which is what the paper's code ran). Output ``Tensor[B, 64]``; the policy and value heads
    (``net_arch``, 64-64 by default as in SB3 with a custom extractor) sit on top.
    """

    def __init__(
        self, observation_space: gym.spaces.Box, features_dim: int = 64, scale: float = 255.0
    ) -> None:
        super().__init__(observation_space, features_dim)
        self.scale = float(scale)
        channels, height, width = observation_space.shape
        self.net = nn.Sequential(
            nn.Conv2d(channels, 16, 3),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * (height - 4) * (width - 4), features_dim),
            nn.ReLU(),
        )

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.net(observations / self.scale)


def _wrap(env: gym.Env, wrapper: str | None) -> gym.Env:
    if wrapper is None:
        return env
    if wrapper == "minigrid-image":
        from minigrid.wrappers import ImgObsWrapper

        return ImgObsWrapper(env)
    raise ValueError(f"wrapper: got {wrapper!r}; supported: None, 'minigrid-image'")


def env_factory(cfg: dict[str, Any]) -> Callable[[], gym.Env]:
    """A thunk building one monitored environment of the config."""
    if cfg["env_id"].startswith("MiniGrid"):
        import minigrid  # noqa: F401  (registers the MiniGrid ids)
    if cfg["env_id"].startswith("highway"):
        import highway_env  # noqa: F401

    def make() -> gym.Env:
        return Monitor(_wrap(gym.make(cfg["env_id"], **cfg.get("env_kwargs", {})), cfg.get("wrapper")))

    return make


def build_model(cfg: dict[str, Any], seed: int) -> PPO:
    """SB3 PPO at the config's settings (policy, optimiser, PPO hyperparameters), seeded."""
    policy_kwargs: dict[str, Any] = {
        "optimizer_class": OPTIMIZERS[cfg["optimizer"]],
        "net_arch": dict(pi=list(cfg["net_arch"]), vf=list(cfg["net_arch"])),
    }
    if cfg["policy"] == "minigrid-cnn":
        policy_kwargs.update(
            features_extractor_class=MiniGridCNN,
            features_extractor_kwargs={"scale": float(cfg.get("image_scale", 255.0))},
            normalize_images=False,
        )
    env = DummyVecEnv([env_factory(cfg)] * int(cfg["n_envs"]))
    return PPO(
        "MlpPolicy", env, seed=seed, device="cpu", policy_kwargs=policy_kwargs, verbose=0, **cfg["ppo"]
    )


def _policy_input(obs: VecEnvObs) -> np.ndarray | dict[str, np.ndarray]:
    if isinstance(obs, tuple):
        raise TypeError("obs: tuple observation spaces are not supported by SB3's predict()")
    return obs


def evaluate(model: BaseAlgorithm, env: VecEnv, episodes: int, seed: int) -> tuple[float, float]:
    """Mean and std of the return of ``episodes`` stochastic-policy episodes.

    Runs in its own torch RNG stream (seeded with ``seed``) so that evaluation never changes the
    training run's random numbers. ``env`` holds ``min(episodes, n)`` parallel copies; each copy
    runs ``episodes / n`` episodes so that short episodes do not crowd out long ones.
    """
    n = env.num_envs
    targets = np.array([(episodes + i) // n for i in range(n)])
    counts, returns, current = np.zeros(n, int), [], np.zeros(n)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        env.seed(seed)
        obs = env.reset()
        while (counts < targets).any():
            actions, _ = model.predict(_policy_input(obs), deterministic=False)
            obs, rewards, dones, _ = env.step(actions)
            current += rewards
            for i in np.flatnonzero(dones):
                if counts[i] < targets[i]:
                    returns.append(current[i])
                    counts[i] += 1
                current[i] = 0.0
    return float(np.mean(returns)), float(np.std(returns))


class LearningCurveCallback(BaseCallback):
    """Evaluates each round's updated policy and times the rounds (evaluation time excluded).

    ``curve[r]``, ``curve_std[r]``: return of the policy after round r + 1; ``seconds[r]``:
    cumulative training seconds (rollout + scoring + update) up to round r + 1 (``cpu_seconds``: the
    same in process CPU time, which a busy shared machine does not inflate); ``rollout[r]``:
    mean return of the episodes that ended during round r + 1's rollout (nan if none).
    """

    def __init__(self, eval_env: VecEnv, episodes: int, seed: int, log_every: int = 10) -> None:
        super().__init__()
        self.eval_env, self.episodes, self.eval_seed, self.log_every = eval_env, episodes, seed, log_every
        self.curve: list[float] = []
        self.curve_std: list[float] = []
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self.eval_cpu_seconds = 0.0
        self._cpu0 = 0.0
        self.rollout: list[float] = []
        self.eval_seconds = 0.0
        self._t0 = 0.0
        self._round_returns: list[float] = []

    def _on_training_start(self) -> None:
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", []):
            if "episode" in info:
                self._round_returns.append(float(info["episode"]["r"]))
        return True

    def _on_rollout_end(self) -> None:
        self.rollout.append(float(np.mean(self._round_returns)) if self._round_returns else float("nan"))
        self._round_returns = []

    def _on_rollout_start(self) -> None:
        if len(self.rollout) > len(self.curve):
            self._evaluate()

    def _on_training_end(self) -> None:
        if len(self.rollout) > len(self.curve):
            self._evaluate()

    def _evaluate(self) -> None:
        start, cpu_start = time.perf_counter(), time.process_time()
        self.seconds.append(start - self._t0 - self.eval_seconds)
        self.cpu_seconds.append(cpu_start - self._cpu0 - self.eval_cpu_seconds)
        r = len(self.curve)
        mean, std = float("nan"), float("nan")
        if self.episodes > 0:
            mean, std = evaluate(self.model, self.eval_env, self.episodes, self.eval_seed * 100_003 + r)
        self.curve.append(mean)
        self.curve_std.append(std)
        self.eval_seconds += time.perf_counter() - start
        self.eval_cpu_seconds += time.process_time() - cpu_start
        if self.log_every and (r + 1) % self.log_every == 0:
            shown = mean if self.episodes > 0 else self.rollout[-1]
            print(f"    round {r + 1}: return {shown:.3f}  train {self.seconds[-1]:.0f}s", flush=True)


def rollout_curve(rollout: list[float]) -> list[float]:
    """The free learning curve: ``curve[r]`` = mean return of the episodes that ended while the policy
    after ``r + 1`` updates collected round ``r + 2`` (``float[n_rounds - 1]``; gaps filled forward).
    """
    values = np.array(rollout[1:], dtype=float)
    finite = np.flatnonzero(np.isfinite(values))
    if finite.size == 0:
        raise ValueError("rollout: no episode ended during training; use eval.episodes > 0")
    values[: finite[0]] = values[finite[0]]
    for i in range(1, values.size):
        if not np.isfinite(values[i]):
            values[i] = values[i - 1]
    return values.tolist()


def tail_stats(scores: torch.Tensor) -> dict[str, float]:
    """How concentrated one round's negative scores are (``scores``: ``Tensor[n]``).

    ``neg_fraction``: share of records scoring below 0; ``top10_share``: share of the negative mass
    (sum of the negative scores) in the most negative 10 % of the negatives; ``m50`` / ``m90``: the
    fraction of the negatives, most negative first, that carries 50 % / 90 % of that mass (what the
    adaptive rule at f = 0.5 / 0.9 drops, before ``min_keep``).
    """
    s = scores.detach().double().flatten()
    neg = torch.sort(s[s < 0]).values
    if neg.numel() == 0:
        return {"neg_fraction": 0.0, "top10_share": float("nan"), "m50": 0.0, "m90": 0.0}
    mass = torch.cumsum(neg, 0) / neg.sum()
    k10 = max(1, int(round(0.1 * neg.numel())))
    return {
        "neg_fraction": neg.numel() / s.numel(),
        "top10_share": float(mass[k10 - 1]),
        "m50": (int((mass < 0.5).sum()) + 1) / neg.numel(),
        "m90": (int((mass < 0.9).sum()) + 1) / neg.numel(),
    }


class StudyIIF(IIFCallback):
    """IIFCallback that also keeps :func:`tail_stats` of every round's first scores (``tails``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tails: list[dict[str, float]] = []

    def _on_round_scored(self, records: Any, scores: Any) -> None:
        if scores.scores.dim() == 1:
            self.tails.append(tail_stats(scores.scores))
        super()._on_round_scored(records, scores)


def epoch_kept_fraction(entry: dict[str, Any], fresh: bool = False) -> float:
    """Mean over a round's epochs of the share of its records that epoch trained on, from one
    ``filter_history`` entry of ``rescore="epoch"`` (``n_kept`` in epoch 1, then minus each
    later epoch's drops) or, with ``fresh``, of ``rescore="epoch-fresh"`` (each later epoch's
    drops are out of all the round's records)."""
    kept = [int(entry["n_kept"])]
    for dropped in entry["epoch_drops"]:
        kept.append((int(entry["n_records"]) if fresh else kept[-1]) - len(dropped))
    return float(np.mean(kept)) / int(entry["n_records"])


def adaptive_f(cfg: dict[str, Any], method: str) -> float | None:
    """The fraction f of an adaptive arm (``iif-adaptive-<f>``, or ``iif.f`` for ``iif-adaptive``);
    None for the other arms. Raises ValueError naming the method when it is no study arm."""
    if method.startswith(ADAPTIVE):
        try:
            f = float(method[len(ADAPTIVE) :].removesuffix(REFILL))
        except ValueError:
            f = float("nan")
        if not 0.0 < f <= 1.0:
            raise ValueError(f"method: got {method!r}; supported: {ARM_FORMS}")
        return f
    validation_steps(cfg, method)  # raises for a bad iif-val-<steps>
    if method not in METHODS and not method.startswith(VALIDATION):
        raise ValueError(f"method: got {method!r}; supported: {ARM_FORMS}")
    return float(cfg["iif"].get("f", 0.5)) if method == "iif-adaptive" else None


def validation_steps(cfg: dict[str, Any], method: str) -> int | None:
    """The side-rollout length of a validation-target arm (``iif-val-<steps>``, or
    ``iif.validation_steps``, default 256, for ``iif-val``); None for the other arms."""
    if method == "iif-val":
        return int(cfg["iif"].get("validation_steps", 256))
    if not method.startswith(VALIDATION):
        return None
    text = method[len(VALIDATION) :]
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"method: got {method!r}; supported: {ARM_FORMS}")
    return int(text)


def arm_order(method: str) -> tuple[int, str, float, bool]:
    """Sort key of the study arms: METHODS in their order, then the parameterised arms by their
    form and number (``iif-adaptive-<f>`` by f, its ``-refill`` arm right after it,
    ``iif-val-<steps>`` by steps)."""
    if method in METHODS:
        return METHODS.index(method), "", 0.0, False
    prefix = ADAPTIVE if method.startswith(ADAPTIVE) else VALIDATION
    return len(METHODS), prefix, float(method[len(prefix) :].removesuffix(REFILL)), method.endswith(REFILL)


def _iif_callback(cfg: dict[str, Any], method: str, seed: int) -> IIFCallback:
    """The IIFCallback of one study arm."""
    settings = cfg["iif"]
    f = adaptive_f(cfg, method)
    kwargs: dict[str, Any] = dict(settings.get("callback", {}))
    p = float(settings["p"])
    if method == "random":
        return StudyIIF(drop="random", p=p, seed=seed, **kwargs)
    if f is not None:
        return StudyIIF(drop="adaptive", rule_kwargs={"f": f}, weighting=weighting(method), **kwargs)
    steps = validation_steps(cfg, method)
    if steps is not None:
        # a separate env, seeded apart from training, whose transitions are never trained on
        val_env = DummyVecEnv([env_factory(cfg)])
        val_env.seed(seed + 1_000_003)
        kwargs.update(score_on="validation", validation_env=val_env, validation_steps=steps)
    if method == "iif-epoch":
        kwargs["rescore"] = "epoch"
    if method == "iif-epoch-fresh":
        kwargs["rescore"] = "epoch-fresh"
    kwargs["weighting"] = weighting(method)
    return StudyIIF(drop="neg-bottom", p=p, seed=seed, **kwargs)


def run_one(cfg: dict[str, Any], method: str, seed: int) -> dict[str, Any]:
    """Train one (method, seed) run for ``cfg["rounds"]`` rounds; returns its curves and timings."""
    f = adaptive_f(cfg, method)
    torch.set_num_threads(1)
    model = build_model(cfg, seed)
    episodes = int(cfg["eval"]["episodes"])
    eval_env = DummyVecEnv([env_factory(cfg)] * max(1, min(episodes, int(cfg["eval"]["n_envs"]))))
    curves = LearningCurveCallback(eval_env, episodes, seed, log_every=cfg.get("log_every", 10))
    callbacks: list[BaseCallback] = [curves]
    iif: IIFCallback | None = None
    if method != "ppo":
        iif = _iif_callback(cfg, method, seed)
        callbacks.insert(0, iif)
    total = int(cfg["rounds"]) * model.n_steps * model.n_envs
    model.learn(total, callback=CallbackList(callbacks))
    eval_env.close()
    if model.env is not None:
        model.env.close()
    history = iif.filter_history if iif is not None else []
    curve, seconds = curves.curve, curves.seconds
    cpu_seconds = curves.cpu_seconds
    if episodes == 0:
        curve, seconds, cpu_seconds = rollout_curve(curves.rollout), seconds[:-1], cpu_seconds[:-1]
    return {
        "method": method,
        "seed": seed,
        "curve": curve,
        "curve_source": "rollout" if episodes == 0 else f"eval-{episodes}",
        "curve_std": curves.curve_std,
        "rollout_curve": curves.rollout,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "eval_seconds": curves.eval_seconds,
        "kept_fraction": [h["kept_fraction"] for h in history],
        "score_seconds": [h["seconds"] for h in (iif.history if iif is not None else [])],
        "min_keep_notes": sum(1 for h in history if h["note"]),
        "n_dropped": [h["n_records"] - h["n_kept"] for h in history],
        # rescore="epoch": records dropped at the start of epochs 2.. of each round, and the share of
        # the round's records each epoch trained on, averaged over the epochs
        "epoch_dropped": [[len(d) for d in h["epoch_drops"]] for h in history if "epoch_drops" in h],
        "epoch_kept_fraction": [
            epoch_kept_fraction(h, fresh=method == "iif-epoch-fresh") for h in history if "epoch_drops" in h
        ],
        "score_tails": iif.tails if isinstance(iif, StudyIIF) else [],
        "adaptive_f": f,
        # weighting "refill"/"soft": records drawn at least once, and the weights' total, per round
        "n_unique": [h["n_unique"] for h in history if "n_unique" in h],
        "weight_sum": [h["weight_sum"] for h in history if "weight_sum" in h],
    }
