"""Implicit Q-Learning (Kostrikov et al. 2022) through TorchRL's :class:`~torchrl.objectives.IQLLoss`.

* Value ``V(s)``: 2x256 ReLU MLP, expectile regression onto the target critic,
  ``L_V = E |tau - 1(Q'(s, a) < V(s))| (Q'(s, a) - V(s))^2`` with ``tau = expectile = 0.7``, where
  ``Q' = min_i Q'_i`` is the twin *target* critic.
* Critic: twin ``Q_i(s, a)`` 2x256 ReLU MLPs, ``L_Q = sum_i E (Q_i(s, a) - r - gamma (1 - terminated) V(s'))^2``
  (``loss_function="l2"``, the paper's MSE; TorchRL's default is smooth-L1). The target critic follows
  by TorchRL's :class:`~torchrl.objectives.SoftUpdate` (``tau = 0.005``); ``V`` has no target network.
* Actor: advantage-weighted regression, ``L_pi = -E min(exp(beta (Q'(s, a) - V(s))), 100) log pi(a | s)``
  with ``beta = temperature = 3.0`` (the paper's locomotion settings), on a tanh-normal actor
  (:func:`~diffpolicy.agents.gaussian_bc.tanh_normal_actor`, 2x256, state-dependent std). Dataset
  actions are clamped to ``+-(1 - 1e-6)`` before the loss (for every term: the critic sees actions
  moved by at most ``1e-6``) so the tanh-normal log-density stays finite.
* One ``update`` = one Adam step (``lr = 3e-4``) each on ``V``, then ``pi``, then ``Q`` (the order of
  the reference implementation, so the actor and the critic see the new ``V``), then the soft target update.
  ``actor_cosine_steps > 0`` decays the actor's learning rate over that many updates by a cosine
  (the paper does this for the actor; off by default as the run length is not known here).
* ``act`` is deterministic: ``tanh(loc(s))`` (TorchRL's ``ExplorationType.DETERMINISTIC``).

Reusing the critic (IDQL)
-------------------------
:func:`make_iql_critic_loss` builds an ``IQLLoss`` whose value and twin Q networks are trained by
``loss.value_loss(td)`` / ``loss.qvalue_loss(td)`` (each returns ``(loss, metadata)``), with a
placeholder actor that has no parameters (so ``loss.actor_loss`` / ``loss(td)`` must not be
called). The caller makes the target updater, ``SoftUpdate(loss, tau=0.005)``, right after, and
reads values with :func:`q_and_v`. Typical IDQL step::

    loss, value, qvalue = make_iql_critic_loss(obs_dim, act_dim, expectile=0.7)
    updater = SoftUpdate(loss, tau=0.005)
    opt_v = Adam(loss.value_network_params.parameters()); opt_q = Adam(loss.qvalue_network_params.parameters())
    lv, _ = loss.value_loss(td); step(opt_v, lv)
    lq, _ = loss.qvalue_loss(td); step(opt_q, lq)
    updater.step()
    q, v = q_and_v(loss, obs, actions)        # min over the twin target Qs, and V

Keep ``loss`` as a submodule of the agent (``self.critic_loss = loss``) so its parameters and
target copies are in ``state_dict``.
"""

from __future__ import annotations

import dataclasses

import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import Tensor, nn
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.objectives import IQLLoss, SoftUpdate, ValueEstimators

from .base import AgentConfig, OfflineAgent
from .gaussian_bc import clamp_action, deterministic_action, tanh_normal_actor
from .td3_bc import twin_qvalue_modules

__all__ = ["IQL", "IQLConfig", "critic_batch", "make_iql_critic_loss", "q_and_v"]


class _NoActor(nn.Module):
    """Parameter-free stand-in policy (``loc = 0, scale = 1``) for an ``IQLLoss`` used as a critic only."""

    def __init__(self, act_dim: int):
        super().__init__()
        self.act_dim = act_dim

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        loc = obs.new_zeros(*obs.shape[:-1], self.act_dim)
        return loc, torch.ones_like(loc)


def _placeholder_actor(act_dim: int) -> ProbabilisticActor:
    module = TensorDictModule(_NoActor(act_dim), in_keys=["observation"], out_keys=["loc", "scale"])
    return ProbabilisticActor(module, in_keys=["loc", "scale"], out_keys=["action"], distribution_class=TanhNormal)


def make_iql_critic_loss(obs_dim: int, act_dim: int, expectile: float = 0.7, *, temperature: float = 3.0,
                         gamma: float = 0.99, hidden: int = 256, depth: int = 2, num_qvalue_nets: int = 2,
                         loss_function: str = "l2", actor: ProbabilisticActor | None = None,
                         ) -> tuple[IQLLoss, TensorDictModule, TensorDictModule]:
    """An ``IQLLoss`` with a ``V(s)`` net and ``num_qvalue_nets`` Q nets (``depth`` x ``hidden`` ReLU MLPs).

    Returns ``(loss, value_module, qvalue_module)``. ``value_module`` (``"observation" -> "state_value"``)
    holds the live parameters (``loss.value_network_params`` are the same tensors).
    ``qvalue_module`` (``("observation", "action") -> "state_action_value"``) is TorchRL's template
    for the ensemble: its trained parameters are the stacked ``loss.qvalue_network_params``
    (``[num_qvalue_nets, ...]``) and their targets ``loss.target_qvalue_network_params``; evaluate
    it through :func:`q_and_v`, not directly. TD targets use ``gamma`` (TorchRL's TD0 estimator,
    bootstrapping on ``("next", "terminated")``).

    Without ``actor`` the loss gets a parameter-free placeholder policy: ``value_loss`` and
    ``qvalue_loss`` work, ``actor_loss`` / ``forward`` are meaningless. ``temperature`` only
    matters for ``actor_loss``. Make ``SoftUpdate(loss, tau)`` before the first loss call.
    """
    value = ValueOperator(MLP(in_features=obs_dim, out_features=1, num_cells=[hidden] * depth,
                              activation_class=nn.ReLU), in_keys=["observation"])
    qvalues = twin_qvalue_modules(obs_dim, act_dim, hidden, depth, n=num_qvalue_nets)
    loss = IQLLoss(actor if actor is not None else _placeholder_actor(act_dim),
                   qvalues if num_qvalue_nets > 1 else qvalues[0], value, num_qvalue_nets=num_qvalue_nets,
                   loss_function=loss_function, temperature=temperature, expectile=expectile)
    loss.make_value_estimator(ValueEstimators.TD0, gamma=gamma)
    return loss, loss.value_network, loss.qvalue_network


def q_and_v(loss: IQLLoss, obs: Tensor, action: Tensor, *, target: bool = True) -> tuple[Tensor, Tensor]:
    """``(min_i Q_i(obs, action), V(obs))``, both ``[N]``, from an ``IQLLoss``'s networks.

    ``target=True`` (default) uses the target critic, as IQL's actor and value losses and IDQL's
    action selection do; ``target=False`` the online one. Differentiable in the online
    parameters; wrap in ``torch.no_grad()`` for acting.
    """
    td = TensorDict({"observation": obs, "action": action}, batch_size=obs.shape[:-1])
    params = loss.target_qvalue_network_params if target else loss.qvalue_network_params
    if params.ndim == 0:  # a single Q network
        params = params.unsqueeze(0)
    qs = []
    for i in range(params.shape[0]):
        with params[i].to_module(loss.qvalue_network):
            qs.append(loss.qvalue_network(td.select("observation", "action"))["state_action_value"].squeeze(-1))
    v = loss.value_network(td.select("observation"))["state_value"].squeeze(-1)
    return torch.stack(qs).min(0).values, v


def critic_batch(batch, action: Tensor) -> TensorDict:
    """The keys ``IQLLoss`` reads: ``observation``, ``action`` and the ``next`` transition."""
    return TensorDict({"observation": batch["observation"], "action": action,
                       "next": batch["next"].select("observation", "reward", "done", "terminated")},
                      batch_size=batch.batch_size)


@dataclasses.dataclass
class IQLConfig(AgentConfig):
    hidden: int = 256
    depth: int = 2
    expectile: float = 0.7
    temperature: float = 3.0
    tau: float = 0.005
    loss_function: str = "l2"
    action_eps: float = 1e-6
    actor_cosine_steps: int = 0


class IQL(OfflineAgent):
    """IQL through ``IQLLoss``: value, actor and critic steps per ``update``; deterministic ``act``."""

    name = "iql"
    config_class = IQLConfig
    reward_normalization = "return_range"  # IQL's MuJoCo setting: rewards x 1000 / (max - min episode return)

    def __init__(self, obs_dim: int, act_dim: int, config: IQLConfig | None = None, **overrides):
        super().__init__(obs_dim, act_dim, config, **overrides)
        c = self.config
        actor = tanh_normal_actor(obs_dim, act_dim, c.hidden, c.depth)
        # A registered submodule: actor, value, twin Q and target-Q parameters are all in state_dict.
        self.loss, _, _ = make_iql_critic_loss(obs_dim, act_dim, c.expectile, temperature=c.temperature,
                                               gamma=c.gamma, hidden=c.hidden, depth=c.depth,
                                               loss_function=c.loss_function, actor=actor)
        self.target_updater = SoftUpdate(self.loss, tau=c.tau)
        self.add_optimizer("value", self.loss.value_network_params.parameters())
        opt_actor = self.add_optimizer("actor", self.loss.actor_network_params.parameters())
        self.add_optimizer("critic", self.loss.qvalue_network_params.parameters())
        self.actor_schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(opt_actor, c.actor_cosine_steps)
                               if c.actor_cosine_steps > 0 else None)

    @property
    def actor(self) -> ProbabilisticActor:
        """The tanh-normal actor (the loss's ``actor_network``; parameters ``loss.actor_network_params``)."""
        return self.loss.actor_network

    def q_and_v(self, obs: Tensor, action: Tensor, *, target: bool = True) -> tuple[Tensor, Tensor]:
        """``(min_i Q_i(s, a), V(s))``, both ``[N]``; see :func:`q_and_v`."""
        return q_and_v(self.loss, obs, action, target=target)

    def update(self, batch) -> dict[str, Tensor]:
        td = critic_batch(batch, clamp_action(batch["action"], self.config.action_eps))
        loss_v, _ = self.loss.value_loss(td)
        self.step("value", loss_v)
        loss_pi, _ = self.loss.actor_loss(td)
        self.step("actor", loss_pi)
        if self.actor_schedule is not None and self.actor_schedule.last_epoch < self.config.actor_cosine_steps:
            self.actor_schedule.step()
        loss_q, meta_q = self.loss.qvalue_loss(td)
        self.step("critic", loss_q)
        self.target_updater.step()
        return {"loss_value": loss_v.detach(), "loss_actor": loss_pi.detach(), "loss_qvalue": loss_q.detach(),
                "bc_nll": -td["_log_prob"].mean()}

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        return deterministic_action(self.actor, obs)

    # the actor's lr schedule is saved with the optimisers
    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        if self.actor_schedule is not None:
            sd["_actor_schedule"] = self.actor_schedule.state_dict()
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = dict(state_dict)
        sched = state_dict.pop("_actor_schedule", None)
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if sched is not None and self.actor_schedule is not None:
            self.actor_schedule.load_state_dict(sched)
        return out
