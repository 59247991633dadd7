"""What every offline agent provides to the shared training loop and evaluation.

An agent is an ``nn.Module`` that owns its networks, optimisers, EMA copies and target
networks. The loop (:func:`diffpolicy.agents.trainer.train_offline`) only calls

* ``update(batch) -> dict`` — one gradient step on a replay batch, returning the loss terms
  and diagnostics as (detached) scalar tensors;
* ``act(obs) -> action`` — evaluation actions in ``[-1, 1]`` for normalised observations
  ``[N, obs_dim]`` (agents with an observation history or action chunks keep their own
  queues, cleared by ``reset()`` before each evaluation);
* ``state_dict()`` / ``load_state_dict()`` (which include optimiser states) for checkpoints.

``sequence_spec`` is ``None`` for agents that learn from transitions, or the keyword
arguments of :meth:`diffpolicy.envs.datasets.OfflineData.sequences` for agents that learn
from observation histories and action chunks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["OfflineAgent", "AgentConfig", "mlp", "eval_mode", "EvalSubmodules"]


@dataclasses.dataclass
class AgentConfig:
    """Settings shared by all agents; each agent extends this dataclass."""

    gamma: float = 0.99
    lr: float = 3e-4
    grad_clip: float | None = None


class OfflineAgent(nn.Module):
    """Base class: subclasses set ``name``, build modules in ``__init__`` and implement
    :meth:`update` and :meth:`act`."""

    name: str = "agent"
    config_class = AgentConfig
    sequence_spec: dict | None = None
    #: ``"return_range"``: train on rewards scaled by ``1000 / (max - min episode return)`` (IQL's
    #: MuJoCo setting, Kostrikov et al. 2022 App. B); ``None``: raw rewards.
    reward_normalization: str | None = None
    #: Config fields that only shape ``act`` (how many candidates, how one is picked), never an
    #: update: a resumed run may change them, and ``diffpolicy eval RUN key=value`` overrides them.
    acting_fields: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        """Every subclass's ``update`` advances ``num_updates`` once per call (also when an
        ``update`` calls its parent's), so EMA and curriculum schedules work outside the trainer."""
        super().__init_subclass__(**kwargs)
        fn = cls.__dict__.get("update")
        if fn is None or getattr(fn, "_counts_updates", False):
            return

        @functools.wraps(fn)
        def update(self, batch):
            if self._in_update:
                return fn(self, batch)
            self._in_update = True
            try:
                out = fn(self, batch)
            finally:
                self._in_update = False
            self.num_updates += 1
            return out

        update._counts_updates = True
        cls.update = update

    def __init__(self, obs_dim: int, act_dim: int, config: AgentConfig | None = None, **overrides: Any):
        super().__init__()
        cfg = config if config is not None else self.config_class()
        if overrides:
            names = {f.name for f in dataclasses.fields(cfg)}
            unknown = sorted(set(overrides) - names)
            if unknown:
                raise TypeError(f"{type(self).__name__} has no setting(s) {unknown}; valid: {sorted(names)}")
            cfg = dataclasses.replace(cfg, **overrides)
        self.obs_dim, self.act_dim, self.config = obs_dim, act_dim, cfg
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self.grad_sync = None  # set by train_offline under DDP: averages the gradients over the ranks
        self.num_updates = 0  # completed ``update`` calls (read inside ``update``: the index of this one)
        self._in_update = False

    # ---------------------------------------------------------------- to override
    def update(self, batch) -> dict[str, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        """Called before each evaluation (clears action queues of chunking agents)."""

    # ---------------------------------------------------------------- helpers
    def add_optimizer(self, name: str, params, lr: float | None = None, **kwargs) -> torch.optim.Optimizer:
        opt = torch.optim.Adam(params, lr=self.config.lr if lr is None else lr, **kwargs)
        self._optimizers[name] = opt
        return opt

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers

    def step(self, name: str, loss: Tensor, params=None) -> Tensor | None:
        """Backward ``loss`` and step optimiser ``name`` (clipping to ``grad_clip`` when set).

        Returns the gradient norm when clipping, else ``None``.
        """
        opt = self._optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_sync is not None:  # before clipping, as DistributedDataParallel would
            self.grad_sync([p for g in opt.param_groups for p in g["params"]])
        norm = None
        if self.config.grad_clip is not None:
            ps = params if params is not None else [p for g in opt.param_groups for p in g["params"]]
            norm = nn.utils.clip_grad_norm_(ps, self.config.grad_clip)
        opt.step()
        return norm

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        sd["_optimizers"] = {k: o.state_dict() for k, o in self._optimizers.items()}
        sd["_num_updates"] = self.num_updates
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = dict(state_dict)
        opts = state_dict.pop("_optimizers", {})
        self.num_updates = int(state_dict.pop("_num_updates", 0))
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        for k, o in self._optimizers.items():
            if k in opts:
                o.load_state_dict(opts[k])
        return out


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """``module`` in eval mode for the block (no dropout, no label dropout), then back to its mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class EvalSubmodules:
    """``nn.Module`` mixin: the submodules named in ``eval_submodules`` stay in eval mode whatever ``train()``
    is asked (a distillation teacher, a fine-tuned chain: they act and are scored without dropout)."""

    eval_submodules: tuple[str, ...] = ()

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.eval_submodules:
            getattr(self, name).eval()
        return self


def mlp(d_in: int, d_out: int, hidden: int = 256, depth: int = 2, activation: type[nn.Module] = nn.ReLU,
        layer_norm: bool = False) -> nn.Sequential:
    """A plain MLP ``d_in -> hidden x depth -> d_out`` (critics, value functions, Gaussian actors)."""
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden)] + ([nn.LayerNorm(hidden)] if layer_norm else []) + [activation()]
        d = hidden
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)
