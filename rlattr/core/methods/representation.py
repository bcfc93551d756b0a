"""AirRep-style representation attribution: encoders and attention pooling trained on subset effects.

A record encoder ``e_r`` and a query encoder ``e_q`` (small MLPs on caller-given features, e.g. the
model's own hidden representation) give the single-record score ``s(q, i) = e_q(q) . e_r(i)``. A
group S of records (an episode, a round's records of one environment) is scored by attention
pooling,

    G(q, S) = |S| sum_{i in S} alpha_i(S) s(q, i),   alpha(S) = softmax_{i in S}(v . e_r(i)),

so a group of one scores like the record and uniform attention gives the additive datamodel
``sum_{i in S} s(q, i)``. Training data are retrained subsets (``rlattr.eval.groundtruth
.subset_retraining``): ``masks: Tensor[M, n]`` and ``effects: Tensor[M, m]``, the measured effect of
training on subset s on fit query j (higher = helped, e.g. minus the query loss). The objective
ranks the subsets of each query like their effects (ListNet over the M subsets, standardised, see
:func:`rlattr.core.methods.distill.listnet_loss`). Query and record encoders are separate because
a training record and a query need not be the same kind of object (the paper shares one encoder).

``objective`` (:data:`OBJECTIVES`): ``"listnet"`` (above); ``"rank_corr"``, minus the Pearson
correlation, per query, between the pooled scores and the *ranks* of the effects (a Spearman
surrogate: LDS is that correlation once the scores are ranked too, so it weights every subset
alike where ListNet's softmax weights the top few); ``"pairwise"``, RankNet's logistic loss
``log(1 + exp(-(z_s - z_t) / T))`` over every pair of subsets with ``effect_s > effect_t``
(``z`` the standardised pooled scores).

``init``: start both encoders from a fitted :class:`DistilledEmbedding` (e.g. one distilled from
an influence function on gradient features) instead of a random start, the way the paper starts
from a pretrained encoder: the subset effects then correct a representation that already ranks
records sensibly, which a few hundred retrained subsets cannot build from scratch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from rlattr.core.methods.base import Attributor, batch_signature
from rlattr.core.methods.distill import (
    DistilledEmbedding,
    Features,
    check_fit_options,
    encode_features,
    listnet_loss,
    make_encoder,
    standardize,
)
from rlattr.core.task import Batch, Task
from rlattr.errors import RlattrError


def rank_corr_loss(pred: Tensor, target: Tensor, temperature: float) -> Tensor:
    """``-mean_j pearson(pred[j], rank(target[j]))`` for ``Tensor[m, M]`` rows (``temperature`` unused)."""
    ranks = target.argsort(1).argsort(1).to(pred)
    return -(standardize(pred) * standardize(ranks)).sum(1).div(pred.shape[1] - 1).mean()


def pairwise_loss(pred: Tensor, target: Tensor, temperature: float) -> Tensor:
    """Mean over rows and ordered pairs ``target[s] > target[t]`` of ``log(1 + exp(-(z_s - z_t) / T))``,
    ``z = standardize(pred)`` per row; ``Tensor[m, M]`` rows."""
    z = standardize(pred)
    diff = (z[:, :, None] - z[:, None, :]) / temperature
    above = (target[:, :, None] > target[:, None, :]).to(pred)
    return (nn.functional.softplus(-diff) * above).sum() / above.sum().clamp_min(1.0)


OBJECTIVES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "listnet": listnet_loss,
    "rank_corr": rank_corr_loss,
    "pairwise": pairwise_loss,
}


def pooled_scores(scores: Tensor, gate: Tensor, masks: Tensor) -> Tensor:
    """``Tensor[m, G]``: ``|S| sum_{i in S} softmax_S(gate)_i scores[:, i]`` for each row S of ``masks``.

    ``scores: Tensor[m, n]``, ``gate: Tensor[n]`` (attention logits), ``masks: Tensor[G, n]`` bool.
    """
    logits = gate.expand(masks.shape[0], -1).masked_fill(~masks, float("-inf"))
    alpha = torch.softmax(logits, dim=1) * masks.sum(1, keepdim=True).to(scores)
    return scores @ alpha.T


class AirRep(Attributor):
    """Trainable record / query encoders with attention pooling, fitted to subset-retraining effects.

    Args:
        task: the Task (kept for the shared interface; the scores need no gradients).
        features: ``batch -> Tensor[n, f]``, the record encoder's input.
        query_features: the query encoder's input (default: ``features``).
        dim, hidden: embedding dimension and hidden width (0: linear encoders).
        steps, lr: full-batch Adam; temperature: T of the ranking loss; seed: initialisation.
        objective: the loss over each query's subsets, a key of :data:`OBJECTIVES`.
        init: a fitted DistilledEmbedding whose encoders start the fit (its features must be these;
            ``dim`` and ``hidden`` are then its encoders'; ``steps=0`` keeps them as they are).
    """

    def __init__(
        self,
        task: Task,
        features: Features,
        *,
        query_features: Features | None = None,
        dim: int = 32,
        hidden: int = 64,
        steps: int = 500,
        lr: float = 1e-2,
        temperature: float = 0.5,
        seed: int = 0,
        init: DistilledEmbedding | None = None,
        objective: str = "listnet",
    ) -> None:
        super().__init__(task)
        if objective not in OBJECTIVES:
            raise RlattrError(f"objective: got {objective!r}; supported: {sorted(OBJECTIVES)}")
        self.objective = objective
        if init is not None and (not isinstance(init, DistilledEmbedding) or init.query_encoder is None):
            raise RlattrError(
                f"init: got {type(init).__name__}; supported: None or a fitted DistilledEmbedding"
            )
        self.init = init
        if not callable(features) or (query_features is not None and not callable(query_features)):
            raise RlattrError("features, query_features: supported: callables batch -> Tensor[n, f]")
        check_fit_options(dim, hidden, steps if init is None else max(steps, 1), lr, temperature)
        self.features, self.query_features = features, query_features or features
        self.dim, self.hidden, self.steps, self.lr = dim, hidden, steps, lr
        self.temperature, self.seed = temperature, seed
        self.networks: nn.ModuleDict | None = None
        self._feats: Tensor | None = None
        self.history: list[float] = []

    def cache(self, train: Batch) -> AirRep:
        self._signature = batch_signature(train)
        self._feats = encode_features(self.features, train, "features")
        return self

    def _check_labels(self, masks: Tensor, effects: Tensor, m: int) -> None:
        assert self._feats is not None
        n = self._feats.shape[0]
        if (
            masks.dim() != 2
            or masks.dtype != torch.bool
            or masks.shape[1] != n
            or not bool(masks.any(1).all())
        ):
            raise RlattrError(
                f"masks: got {masks.dtype} {tuple(masks.shape)}; supported: bool Tensor[M, {n}], "
                "each row keeping >= 1 record"
            )
        if effects.shape != (masks.shape[0], m) or not bool(effects.isfinite().all()):
            raise RlattrError(
                f"effects: got shape {tuple(effects.shape)}; supported: finite Tensor[M, m] = "
                f"{(masks.shape[0], m)} (one column per fit query)"
            )

    def fit(self, queries: Batch, masks: Tensor, effects: Tensor) -> AirRep:
        """Fit encoders and attention to the effects of training on each subset on each query."""
        if self._feats is None:
            raise RuntimeError("AirRep.fit: call cache(train) first")
        fq = encode_features(self.query_features, queries, "query_features").to(self._feats)
        self._check_labels(masks, effects, fq.shape[0])
        mods = self._networks(fq.shape[1])
        opt = torch.optim.Adam(mods.parameters(), lr=self.lr)
        target = effects.to(self._feats).T  # [m, M]: each query's list of subsets
        self.history = []
        for _ in range(self.steps):
            opt.zero_grad()
            rec = mods["record"](self._feats)
            pooled = pooled_scores(mods["query"](fq) @ rec.T, mods["gate"](rec).squeeze(1), masks)
            loss = OBJECTIVES[self.objective](pooled, target, self.temperature)
            loss.backward()
            opt.step()
            self.history.append(float(loss.detach()))
        self.networks = mods
        with torch.no_grad():
            self._train = mods["record"](self._feats)
        return self

    def _networks(self, n_query_features: int) -> nn.ModuleDict:
        """Record / query encoders (random, or copies of ``init``'s) and a zero attention gate."""
        assert self._feats is not None
        dtype = self._feats.dtype
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            if self.init is not None:
                assert self.init.record_encoder is not None and self.init.query_encoder is not None
                record = copy.deepcopy(self.init.record_encoder).to(dtype)
                query = copy.deepcopy(self.init.query_encoder).to(dtype)
            else:
                record = make_encoder(self._feats.shape[1], self.hidden, self.dim, dtype)
                query = make_encoder(n_query_features, self.hidden, self.dim, dtype)
            dim = int(record(self._feats[:1]).shape[1])
            gate = nn.Linear(dim, 1, bias=False).to(dtype)
            nn.init.zeros_(gate.weight)  # start at uniform attention: the additive datamodel
        return nn.ModuleDict({"record": record, "query": query, "gate": gate})

    def _embed(self, query: Batch) -> tuple[Tensor, Tensor]:
        if self._train is None or self.networks is None:
            raise RuntimeError("AirRep: call cache(train) and fit(queries, masks, effects) first")
        with torch.no_grad():
            q = self.networks["query"](
                encode_features(self.query_features, query, "query_features").to(self._train)
            )
        return q @ self._train.T, self.networks["gate"](self._train).squeeze(1).detach()

    def astype(self, dtype: torch.dtype) -> AirRep:
        """Serve in ``dtype`` (e.g. train in float64, answer queries in float32)."""
        if self._train is None or self.networks is None:
            raise RuntimeError("AirRep: call cache(train) and fit(queries, masks, effects) first")
        self.networks, self._train = self.networks.to(dtype), self._train.to(dtype)
        return self

    def attribute(self, query: Batch) -> Tensor:
        return self._embed(query)[0]

    def group_scores(self, query: Batch, groups: Tensor) -> Tensor:
        """``Tensor[m, G]``: pooled score of each group (row of bool ``groups: Tensor[G, n]``)."""
        scores, gate = self._embed(query)
        n = scores.shape[1]
        if (
            groups.dim() != 2
            or groups.dtype != torch.bool
            or groups.shape[1] != n
            or not bool(groups.any(1).all())
        ):
            raise RlattrError(
                f"groups: got {groups.dtype} {tuple(groups.shape)}; supported: bool Tensor[G, {n}], "
                "each row holding >= 1 record"
            )
        with torch.no_grad():
            return pooled_scores(scores, gate, groups)


__all__ = ["OBJECTIVES", "AirRep", "pairwise_loss", "pooled_scores", "rank_corr_loss"]
