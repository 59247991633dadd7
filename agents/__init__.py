"""One RL algorithm per module (``diffpolicy.agents``), one training loop for all.

Offline agents (:class:`~diffpolicy.agents.base.OfflineAgent`), by name:

==================  =============================  ==========================================
name                module                         what
==================  =============================  ==========================================
diffusion_bc        ``diffusion_bc``               diffusion BC, MLP denoiser on states
diffusion_policy    ``diffusion_policy``           Diffusion Policy: obs history, action chunks,
                                                   temporal U-Net, receding horizon
diffusion_ql        ``diffusion_ql``               Diffusion-QL: BC + Q through the chain
idql                ``idql``                       IDQL: IQL critic + diffusion behaviour policy,
                                                   Q-weighted resampling
consistency_bc      ``consistency_policy``         consistency BC (consistency training)
consistency_bc_cd   ``consistency_policy``         consistency BC distilled from a diffusion BC
consistency_ac      ``consistency_policy``         consistency actor-critic (Q term)
gaussian_bc         ``gaussian_bc``                Gaussian (tanh-normal) BC baseline
td3_bc              ``td3_bc``                     TD3+BC through TorchRL's ``TD3BCLoss``
iql                 ``iql``                        IQL through TorchRL's ``IQLLoss``
==================  =============================  ==========================================

``make_agent(name, obs_dim, act_dim, **settings)`` builds one; ``train_offline`` (in
:mod:`~diffpolicy.agents.trainer`) trains any of them; ``load_agent(run_dir)`` rebuilds the
trained agent of any run directory (offline or online) from its ``config.json`` and checkpoint.

Online fine-tuning agents start from a trained BC policy (``make_online_agent(name, bc)``:
``Cls.from_diffusion_bc(bc)``, or ``GaussianPPO.from_gaussian_bc(gbc)``) and train with ``train_online`` (in
:mod:`~diffpolicy.agents.online`, TorchRL collectors on vectorised gymnasium envs):

==================  =============================  ==========================================
dppo                ``dppo``                       DPPO: PPO over the last K' denoising steps
drwr                ``drwr``                       reward-weighted diffusion regression
dawr                ``dawr``                       advantage-weighted diffusion regression
qsm                 ``qsm``                        Q-score matching, off-policy twin critic
gaussian_ppo        ``gaussian_ppo``               tanh-normal PPO via TorchRL ``ClipPPOLoss``
==================  =============================  ==========================================

Reward fine-tuning of image models (``Cls(model, reward, size, **settings).fit(iterations)``;
rewards in :mod:`diffpolicy.images.rewards`, shared parts in ``image_tuning``):

==================  =============================  ==========================================
ddpo                ``ddpo``                       DDPO-SF / DDPO-IS over the sampling chain
draft               ``draft``                      DRaFT-K: reward gradient through K steps
refl                ``refl``                       ReFL: reward on a late one-step x0
==================  =============================  ==========================================
"""

from __future__ import annotations

import difflib
import importlib

__all__ = ["AGENTS", "ONLINE_AGENTS", "IMAGE_TUNERS", "image_tuner_class", "agent_class", "make_agent", "make_online_agent", "load_agent",
           "describe_agent"]

AGENTS = {
    "diffusion_bc": "diffusion_bc:DiffusionBC",
    "diffusion_policy": "diffusion_policy:DiffusionPolicy",
    "diffusion_ql": "diffusion_ql:DiffusionQL",
    "idql": "idql:IDQL",
    "consistency_bc": "consistency_policy:ConsistencyBC",
    "consistency_bc_cd": "consistency_policy:ConsistencyDistilledBC",
    "consistency_ac": "consistency_policy:ConsistencyAC",
    "gaussian_bc": "gaussian_bc:GaussianBC",
    "td3_bc": "td3_bc:TD3BC",
    "iql": "iql:IQL",
}


ONLINE_AGENTS = {
    "dppo": "dppo:DPPO",
    "drwr": "drwr:DRWR",
    "dawr": "dawr:DAWR",
    "qsm": "qsm:QSM",
    "gaussian_ppo": "gaussian_ppo:GaussianPPO",
}


IMAGE_TUNERS = {  # reward fine-tuning of image models: name -> module:class
    "ddpo": "ddpo:DDPO",
    "draft": "draft:DRaFT",
    "refl": "refl:ReFL",
    "drwr": "image_drwr:ImageDRWR",
}


def image_tuner_class(name: str):
    """The image reward fine-tuner registered as ``name`` (``ddpo``, ``draft``, ``refl``, ``drwr``)."""
    if name not in IMAGE_TUNERS:
        close = difflib.get_close_matches(name, IMAGE_TUNERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown image fine-tuner {name!r}{hint}; valid: {', '.join(IMAGE_TUNERS)}")
    module, cls = IMAGE_TUNERS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def agent_class(name: str):
    """The agent class registered as ``name`` (offline or online)."""
    known = {**AGENTS, **ONLINE_AGENTS}
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown agent {name!r}{hint}; offline: {', '.join(AGENTS)}; "
                         f"online: {', '.join(ONLINE_AGENTS)}")
    module, cls = known[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def make_agent(name: str, obs_dim: int, act_dim: int, **settings):
    """Build offline agent ``name`` for ``obs_dim``-d observations and ``act_dim``-d actions."""
    if name in ONLINE_AGENTS:
        raise ValueError(f"{name!r} fine-tunes a trained policy online: build it with make_online_agent({name!r}, bc)")
    return agent_class(name)(obs_dim, act_dim, **settings)


def make_online_agent(name: str, pretrained=None, *, obs_dim: int | None = None, act_dim: int | None = None,
                      policy=None, **settings):
    """Online agent ``name`` (``dppo``, ``drwr``, ``dawr``, ``qsm``: from a trained ``diffusion_bc``;
    ``gaussian_ppo``: from a ``gaussian_bc``) starting from ``pretrained``.

    From scratch (``pretrained=None``): the policy is an untrained ``diffusion_bc`` (``gaussian_bc``)
    for ``obs_dim`` / ``act_dim``, built with ``policy`` (its config, or a dict of its settings)."""
    if name not in ONLINE_AGENTS:
        agent_class(name)  # the unknown-name error, with a suggestion
        raise ValueError(f"{name!r} is an offline agent: train it with `diffpolicy train` / train_offline; "
                         f"online fine-tuning agents: {', '.join(ONLINE_AGENTS)}")
    need = "gaussian_bc" if name == "gaussian_ppo" else "diffusion_bc"
    scratch = pretrained is None
    if scratch:
        if obs_dim is None or act_dim is None:
            raise ValueError(f"{name} from scratch needs obs_dim and act_dim (or a trained {need} to start from)")
        import dataclasses

        policy = policy or {}
        pretrained = make_agent(need, obs_dim, act_dim, **(
            {"config": policy} if dataclasses.is_dataclass(policy) else policy))
    elif policy is not None or obs_dim is not None or act_dim is not None:
        raise ValueError("policy=, obs_dim= and act_dim= build a policy from scratch; a trained one brings its own")
    if getattr(pretrained, "name", None) != need:
        raise ValueError(f"{name} fine-tunes a trained {need}, got {getattr(pretrained, 'name', type(pretrained))!r}")
    cls = agent_class(name)
    agent = (cls.from_gaussian_bc if name == "gaussian_ppo" else cls.from_diffusion_bc)(pretrained, **settings)
    if scratch:  # train_online records it: load_agent rebuilds the run, and a resume must use the same policy
        agent.scratch_policy = {"run": None, **describe_agent(pretrained)}
    return agent


def describe_agent(agent) -> dict:
    """What rebuilds ``agent``'s architecture without its weights: name, config, sizes (JSON-able)."""
    import dataclasses
    import json

    return json.loads(json.dumps({"agent": agent.name, "agent_config": dataclasses.asdict(agent.config),
                                  "obs_dim": agent.obs_dim, "act_dim": agent.act_dim}, default=str))


def _build(desc: dict):
    """An untrained agent from :func:`describe_agent`'s record."""
    return make_agent(desc["agent"], desc["obs_dim"], desc["act_dim"],
                      **_json_settings(agent_class(desc["agent"]), desc.get("agent_config", {})))


def load_agent(run_dir):
    """The trained agent of a run directory of ``train_offline`` or ``train_online`` (its
    ``config.json`` and checkpoint; loading runs no code from the files), in eval mode.

    Everything comes from the run directory itself: the sizes and, for an online run, the
    architecture of the policy it started from are recorded in its ``config.json``. (Runs
    written before those records: an offline run takes its sizes from its env; an online run
    needs ``"pretrained"``, the run it started from, to still exist.)
    """
    import json
    import pathlib

    from diffpolicy.checkpoint import CheckpointError, load_checkpoint, load_state_checked

    run = pathlib.Path(run_dir)
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no config.json): give the directory that "
                                "`diffpolicy train` / `diffpolicy finetune` wrote")
    meta = json.loads((run / "config.json").read_text())
    name, settings = meta.get("agent"), dict(meta.get("agent_config", {}))
    if name not in AGENTS and name not in ONLINE_AGENTS:
        raise ValueError(f"{run} is not an RL agent's run (agent {name!r} in its config.json); "
                         f"image runs load with diffpolicy.images.load_pretrained")
    saved = load_checkpoint(run)
    if name in ONLINE_AGENTS:
        source = meta.get("pretrained")
        if isinstance(source, dict) and "agent" in source:
            base = _build(source)  # weights come from this run's checkpoint
        elif isinstance(source, str):  # runs written before the architecture was recorded
            base = load_agent(source)
        else:
            raise ValueError(f"{run} is a {name} run that does not record the policy it started from "
                             "(\"pretrained\" in config.json; runs started in Python before this was recorded): "
                             "rebuild it with make_online_agent and load_training_state, or call train_online "
                             "on it once more with its agent (which records it)")
        agent = make_online_agent(name, base, **_json_settings(agent_class(name), settings))
        try:
            agent.load_training_state(saved["agent"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"the checkpoint in {run} does not fit this {name} agent: {e}") from None
    else:
        if "obs_dim" in meta and "act_dim" in meta:
            obs_dim, act_dim = meta["obs_dim"], meta["act_dim"]
        elif meta.get("env_id"):
            import gymnasium as gym

            env = gym.make(meta["env_id"])
            obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
            env.close()
        else:
            raise ValueError(f"{run}'s config.json records neither the sizes nor the environment; build the "
                             "agent with make_agent and load_checkpoint")
        agent = _build({"agent": name, "agent_config": settings, "obs_dim": obs_dim, "act_dim": act_dim})
        load_state_checked(agent, saved["agent"], f"{name} agent", run)
    return agent.eval()


def _json_settings(cls, settings: dict) -> dict:
    """Settings read back from config.json, typed as the agent's config fields (lists -> tuples).
    Settings the agent has since retired (``cls.retired_settings``: training-only knobs of an older
    version of its update) are dropped, and settings added since with a default that would change
    an older run's network take the value that run was built with (``cls.legacy_settings``), so
    older runs still load for acting."""
    import dataclasses

    from diffpolicy.config import load_config

    retired = getattr(cls, "retired_settings", ())
    settings = {**getattr(cls, "legacy_settings", {}), **settings}
    cfg = load_config(cls.config_class, **{k: v for k, v in settings.items() if k not in retired})
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
