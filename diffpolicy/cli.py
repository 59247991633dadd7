"""The ``diffpolicy`` command line.

``demo`` (the end-to-end story: dataset, offline training, online fine-tuning, comparison),
``toy-demo`` (samplers on a 2-D toy), ``dataset make|list|info``, ``train``, ``finetune``,
``eval``, ``compare`` and ``image pretrain|sample|distill|finetune``.

Config-driven commands take ``--config FILE.yaml`` and ``key=value`` overrides of their config
dataclasses (:mod:`diffpolicy.config`); an unknown key is an error naming the closest one.
Errors in what the user gave (an unknown dataset, a bad key, a damaged file) print one line
starting with ``error:`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys

from .demo import DemoConfig, run_demo


def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--field`` option per dataclass field, with the field's comment-free default."""
    for f in dataclasses.fields(cls):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                            help=f"(default: {f.default})")


def _settings_args(parser: argparse.ArgumentParser, what: str) -> None:
    """``key=value`` overrides, ``--config FILE.yaml`` and ``--no-progress`` of a config-driven command."""
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=what)
    parser.add_argument("--config", default=None, help=f"YAML file of {what}")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffpolicy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    story = sub.add_parser("demo", help="the end-to-end story (about 10 minutes on 2 CPU cores): make a Pendulum "
                                        "dataset with an SB3 policy, train Gaussian BC, diffusion BC and "
                                        "Diffusion-QL, fine-tune the diffusion BC with DPPO, compare")
    story.add_argument("--out", default="runs/demo", help="directory of the runs, table and plot (default runs/demo)")
    story.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test, about a minute)")
    story.add_argument("--no-progress", dest="progress", action="store_false")
    demo = sub.add_parser("toy-demo", help="fit eps/v/rectified-flow/consistency models on a 2-D toy and "
                                           "compare samplers (sliced Wasserstein vs NFE and time)")
    _add_dataclass_args(demo, DemoConfig)
    demo.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")

    ds = sub.add_parser("dataset", help="make, list and inspect local Minari datasets")
    ds_sub = ds.add_subparsers(dest="dataset_command", required=True)
    make = ds_sub.add_parser("make", help="make a D4RL-style dataset with an SB3 behaviour policy trained here")
    make.add_argument("env_id", help="gymnasium id, e.g. Hopper-v5")
    make.add_argument("quality", choices=("random", "medium", "expert", "medium-replay", "medium-expert"),
                      help="D4RL's dataset qualities")
    make.add_argument("--transitions", type=int, default=1_000_000, help="size (default: 1000000, as D4RL)")
    make.add_argument("--algo", default="sac", choices=("sac", "td3", "tqc"),
                      help="the SB3 behaviour agent (default: sac; tqc needs sb3-contrib)")
    make.add_argument("--behaviour-steps", type=int, default=150_000, help="SB3 training steps (default: 150000)")
    make.add_argument("--behaviour-eval-every", type=int, default=None,
                      help="steps between the behaviour run's checkpoints (default: about a 15th of its steps, "
                           "1000 to 10000, dividing them)")
    make.add_argument("--ref-episodes", type=int, default=50, help="episodes for the reference scores (default: 50)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that id")
    ds_sub.add_parser("list", help="list the local Minari datasets")
    info = ds_sub.add_parser("info", help="size, spaces and reference scores of a dataset")
    info.add_argument("dataset_id")

    from diffpolicy.agents import AGENTS, ONLINE_AGENTS
    from diffpolicy.agents.online import OnlineConfig
    from diffpolicy.agents.trainer import TrainConfig

    fields = (lambda cls: ", ".join(f.name for f in dataclasses.fields(cls)))

    train = sub.add_parser("train", help="train an offline agent on a Minari dataset (resumes RUN_DIR)",
                           description="Train an offline agent. Settings: the agent's config fields and "
                                       f"TrainConfig's ({fields(TrainConfig)}), as key=value or in --config; prefix "
                                       "agent. / train. when needed.")
    train.add_argument("agent", choices=list(AGENTS), metavar="AGENT", help=f"one of: {', '.join(AGENTS)}")
    train.add_argument("run_dir", help="run directory: config.json, train.csv, eval.csv, tb/, checkpoint "
                                       "(an existing run continues; a larger steps= extends it)")
    train.add_argument("--dataset", required=True, help="Minari dataset id (local, e.g. diffpolicy/hopper/medium-v0; "
                                                        "a remote id downloads when the network allows)")
    train.add_argument("--env", default=None, help="gymnasium id for evaluation (default: the dataset's env)")
    train.add_argument("--drop-nonfinite", action="store_true",
                       help="drop the dataset's transitions that hold NaN or inf (default: refuse such a dataset)")
    _settings_args(train, "settings (flat, or under agent: / train:)")

    ft = sub.add_parser("finetune", help="fine-tune a trained BC run online (DPPO, DRWR, DAWR, QSM, Gaussian PPO)",
                        description="Fine-tune online from a trained run: dppo/drwr/dawr/qsm from a diffusion_bc "
                                    "run, gaussian_ppo from a gaussian_bc run; or, without --from, train from "
                                    "scratch on --env (an untrained policy, its settings under policy.). "
                                    f"Settings: the agent's config fields and OnlineConfig's ({fields(OnlineConfig)}).")
    ft.add_argument("agent", choices=list(ONLINE_AGENTS), metavar="AGENT", help=f"one of: {', '.join(ONLINE_AGENTS)}")
    ft.add_argument("run_dir", help="run directory of the fine-tuning (an existing run continues)")
    ft.add_argument("--from", dest="source", default=None,
                    help="run directory of the trained BC policy (without it: from scratch on --env)")
    ft.add_argument("--env", default=None, help="gymnasium id (default: the pre-training dataset's env)")
    _settings_args(ft, "settings (flat, or under agent: / train:; from scratch, the new policy's under policy:)")

    ev = sub.add_parser("eval", help="evaluate the agent of a run directory (fixed seeds, normalised score)")
    ev.add_argument("run_dir")
    ev.add_argument("overrides", nargs="*", metavar="key=value",
                    help="acting-only settings of the agent, to re-score a trained run without training again "
                         "(diffusion BC: sampler=ddim temperature=0; IDQL: also selection=argmax|expectile|quantile "
                         "candidates=N; Diffusion-QL: candidates=N)")
    ev.add_argument("--episodes", type=int, default=10, help="episodes (default 10)")
    ev.add_argument("--seed", type=int, default=1_000_000, help="seed of the first episode (default 1000000)")
    ev.add_argument("--env", default=None, help="gymnasium id (default: the run's env)")

    cmp = sub.add_parser("compare", help="table (Markdown, JSON) and plot (PNG) over run directories; runs "
                                         "with the same label are seeds of one method")
    cmp.add_argument("run_dirs", nargs="+")
    cmp.add_argument("--out", default=None, help="write OUT.md, OUT.json and OUT.png (default: print the table only)")
    cmp.add_argument("--labels", nargs="+", default=None, help="one label per run (default: the agent's name)")

    img = sub.add_parser("image", help="pre-train and sample image diffusion models (digits or your folder)")
    img_sub = img.add_subparsers(dest="image_command", required=True)
    pre = img_sub.add_parser("pretrain", help="train one model family (ImagePretrainConfig: family=ddpm_eps|ddpm_x0|"
                                              "ddpm_v|rf|ct|trigflow, steps=..., size=8|16, ...); resumes a run dir")
    pre.add_argument("run_dir", help="run directory: config.json, logs, checkpoint (an existing one continues)")
    _settings_args(pre, "ImagePretrainConfig fields")
    dis = img_sub.add_parser("distill", help="distil a pre-trained run into a few-step student (DistillConfig: "
                                             "method=pd|cd|reflow|instaflow|dmd|add, student_steps=..., ...)")
    dis.add_argument("run_dir", help="run directory of the student (an existing one continues)")
    dis.add_argument("--teacher", required=True, help="the pre-training run directory to distil")
    _settings_args(dis, "DistillConfig fields")
    fin = img_sub.add_parser("finetune", help="fine-tune a pre-trained run with a reward (ddpo, draft, refl, drwr)",
                             description="Reward fine-tuning. Settings: the tuner's config fields (sampling_steps, "
                                         "batch_size, lr, kl_weight, importance_sampling, grad_steps, ...) and "
                                         "run.reward (class, brightness, contrast, compressibility, "
                                         "incompressibility), run.target_class (class reward with num_classes=0), "
                                         "run.iterations, run.checkpoint_every.")
    fin.add_argument("method", help="ddpo, draft, refl or drwr")
    fin.add_argument("run_dir", help="run directory of the fine-tuned model (an existing one continues)")
    fin.add_argument("--from", dest="source", required=True, help="the pre-training run directory to start from")
    _settings_args(fin, "settings (flat, or under agent: / run:)")
    smp = img_sub.add_parser("sample", help="sample a grid from an image run: pre-trained, distilled or fine-tuned "
                                            "(its EMA weights)")
    smp.add_argument("run_dir")
    smp.add_argument("--n", type=int, default=100, help="images (labels 0..9 in turn; default 100)")
    smp.add_argument("--steps", type=int, default=None, help="sampling steps (default 20; a student: its own)")
    smp.add_argument("--sampler", default=None, help="ddim, ddpm, dpmpp_2m, rf_euler, consistency, ... "
                                                     "(default ddim; a student: its own)")
    smp.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--out", default=None, help="PNG path (default RUN_DIR/samples.png); the tensor goes beside it as .pt")
    return parser


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def _distributed(device: str = "cpu"):
    """Under torchrun: one process group for the command (NCCL with this rank's GPU for a CUDA
    ``device``, gloo otherwise); yields the device this rank uses. Without torchrun: nothing."""
    if not _launched_by_torchrun():
        yield device
        return
    import torch
    import torch.distributed as dist

    from diffpolicy.runlog import check_device

    check_device(device)  # a bad device is a one-line error here too, before any process group
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = str(check_device(f"cuda:{local}"))  # this rank's GPU must be visible to it
        torch.cuda.set_device(local)
    import datetime

    # generous: rank 0 evaluates and checkpoints while the others wait at the next collective
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=datetime.timedelta(hours=2))
    try:
        yield device
    finally:
        dist.destroy_process_group()


def _error(e: Exception) -> int:
    print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, also for torch's multi-line messages
    return 2


def _open_data(dataset: str | None, drop_nonfinite: bool = False):
    """The dataset of a run (None for an online run from scratch, which knows no dataset)."""
    from diffpolicy.envs.datasets import OfflineData, load_dataset

    if dataset is None:
        return None
    return OfflineData.from_minari(load_dataset(dataset), drop_nonfinite=drop_nonfinite)


def _train_command(args) -> int:
    from diffpolicy.agents import agent_class, make_agent
    from diffpolicy.agents.trainer import TrainConfig, train_offline
    from diffpolicy.config import load_sections

    cls = agent_class(args.agent)
    conf = load_sections({"agent": cls.config_class, "train": TrainConfig}, args.config, args.overrides)
    data = _open_data(args.dataset, args.drop_nonfinite)
    agent = make_agent(args.agent, data.obs_dim, data.act_dim, config=conf["agent"])
    with _distributed(conf["train"].device) as device:  # under torchrun: data parallel (gloo / NCCL)
        out = train_offline(agent, data, dataclasses.replace(conf["train"], device=device), env_id=args.env,
                            run_dir=args.run_dir, progress=args.progress)
    if int(os.environ.get("RANK", "0")):
        return 0
    final = out["final"]
    print(f"{args.agent}: {out['steps']} steps, final score {final['score_mean']:.1f} ± {final['score_std']:.1f} "
          f"(return {final['return_mean']:.1f}) -> {args.run_dir}" if final else f"{args.agent}: {out['steps']} steps")
    return 0


def _finetune_command(args) -> int:
    import json
    from pathlib import Path

    import torch

    from diffpolicy.agents import agent_class, describe_agent, load_agent, make_online_agent
    from diffpolicy.agents.online import OnlineConfig, train_online
    from diffpolicy.config import load_sections
    from diffpolicy.envs.factory import make_gym_env

    need = "gaussian_bc" if args.agent == "gaussian_ppo" else "diffusion_bc"
    sections = {"agent": agent_class(args.agent).config_class, "train": OnlineConfig}
    if args.source is None:  # from scratch: the new policy's settings go under policy:
        if args.env is None:
            raise ValueError("give --from RUN_DIR (a trained BC run to fine-tune) or --env ENV_ID (to start from scratch)")
        sections["policy"] = agent_class(need).config_class
    conf = load_sections(sections, args.config, args.overrides)
    if args.source is None:
        env = make_gym_env(args.env)
        obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
        env.close()
        torch.manual_seed(conf["train"].seed)  # the untrained policy's weights: the same seed, the same run
        agent = make_online_agent(args.agent, obs_dim=obs_dim, act_dim=act_dim, policy=conf["policy"],
                                  config=conf["agent"])
        data, env_id, pretrained = None, args.env, None  # the agent describes its untrained policy itself
    else:
        source = Path(args.source)
        bc = load_agent(source)
        meta = json.loads((source / "config.json").read_text())
        # the pre-training's observation normalisation and reference scores
        data = _open_data(meta["dataset"], meta.get("drop_nonfinite", False))
        agent = make_online_agent(args.agent, bc, config=conf["agent"])
        env_id, pretrained = args.env or meta["env_id"], {"run": str(source.resolve()), **describe_agent(bc)}
    out = train_online(agent, env_id, data, conf["train"], run_dir=args.run_dir, progress=args.progress,
                       pretrained=pretrained)
    first, last = out["history"][0], out["history"][-1]
    key = "return_mean" if last["score_mean"] != last["score_mean"] else "score_mean"  # nan: no reference scores
    print(f"{args.agent}: {out['env_steps']} env steps, {key.split('_')[0]} {first[key]:.1f} -> {last[key]:.1f} "
          f"-> {args.run_dir}")
    return 0


def _eval_command(args) -> int:
    import json
    from pathlib import Path

    from diffpolicy.agents import load_agent
    from diffpolicy.config import override_config
    from diffpolicy.envs.factory import evaluate

    run = Path(args.run_dir)
    agent = load_agent(run)
    acting = getattr(agent, "acting_fields", ())  # offline agents declare them; fine-tuned policies have none
    if args.overrides:
        agent.config = override_config(agent.config, args.overrides, only=acting)
    meta = json.loads((run / "config.json").read_text())
    data = _open_data(meta["dataset"], meta.get("drop_nonfinite", False))
    score_fn = data.normalized_score if data is not None and data.ref_min_score is not None else None
    import torch

    torch.manual_seed(args.seed)  # the policy's own noise too: the same run and seed give the same numbers
    res = evaluate(agent.act, args.env or meta["env_id"], episodes=args.episodes, seed=args.seed,
                   obs_loc=None if data is None else data.obs_mean, obs_scale=None if data is None else data.obs_std,
                   score_fn=score_fn, reset=agent.reset,
                   action_chunk=getattr(agent, "action_chunk", 1))
    print(json.dumps({"run": str(run), "agent": meta["agent"], "episodes": args.episodes,
                      "settings": {k: getattr(agent.config, k) for k in acting},
                      "return_mean": res.return_mean, "return_std": res.return_std,
                      "score_mean": res.score_mean, "score_std": res.score_std}))
    return 0


def _compare_command(args) -> int:
    from diffpolicy.compare import compare_runs, markdown

    report = compare_runs(args.run_dirs, args.out, args.labels)
    print(markdown(report), end="")
    if args.out:
        print(f"wrote {args.out}.md, .json and .png")
    return 0


def _dataset_command(args) -> int:
    from diffpolicy.envs import datasets as D

    if args.dataset_command == "make":
        existed = not args.overwrite and D.dataset_id(args.env_id, args.quality) in D.local_datasets()
        ds = D.make_dataset(args.env_id, args.quality, n_transitions=args.transitions,
                            behaviour_algo=args.algo, behaviour_steps=args.behaviour_steps,
                            behaviour_eval_every=args.behaviour_eval_every,
                            ref_episodes=args.ref_episodes, seed=args.seed,
                            overwrite=args.overwrite)
        if existed:  # make_dataset reuses it as it is: the settings given here were not applied
            source = ds.storage.metadata.get("algorithm_name", "?")
            print(f"reusing the existing {ds.spec.dataset_id} ({ds.total_episodes} episodes, {ds.total_steps} steps; "
                  f"{source}); the options given were not applied: add --overwrite to make it again")
        else:
            print(f"made {ds.spec.dataset_id}: {ds.total_episodes} episodes, {ds.total_steps} steps")
    elif args.dataset_command == "list":
        for did in D.local_datasets():
            print(did)
    else:
        try:
            ds = D.load_dataset(args.dataset_id, download=False)
        except D.DatasetNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        md = ds.storage.metadata
        print(f"{ds.spec.dataset_id}: {ds.total_episodes} episodes, {ds.total_steps} steps")
        print(f"env: {getattr(ds.spec.env_spec, 'id', None)}; observations {ds.observation_space.shape}, "
              f"actions {ds.action_space.shape}")
        print(f"ref_min_score {md.get('ref_min_score')}, ref_max_score {md.get('ref_max_score')}")
        print(f"algorithm: {md.get('algorithm_name')}")
    return 0


def _image_command(args) -> int:
    from pathlib import Path

    import torch

    from diffpolicy.config import ConfigError, load_config
    from diffpolicy.images import ImagePretrainConfig, image_grid, load_image_model, pretrain_images, sample_images

    run = Path(args.run_dir)
    if args.image_command == "pretrain":
        try:
            cfg = load_config(ImagePretrainConfig, args.config, args.overrides)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        with _distributed(cfg.device) as device:
            if device != cfg.device:
                cfg = dataclasses.replace(cfg, device=device)
            out = pretrain_images(cfg, run_dir=run, progress=args.progress and not _launched_by_torchrun())
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{cfg.family}: {out['steps']} steps, last loss {out['history'][-1]['loss']:.4f} ({run})")
        return 0
    if args.image_command == "distill":
        from diffpolicy.distill.students import DistillConfig, distill_run

        cfg = load_config(DistillConfig, args.config, args.overrides)
        rec = distill_run(run, args.teacher, cfg, progress=args.progress)
        print(f"{cfg.method} student of {args.teacher}: samples with {rec['sampler']} at {rec['steps']} steps "
              f"({rec['train_seconds']:.0f} s) -> {run}")
        return 0
    if args.image_command == "finetune":
        return _image_finetune(args, run)
    cfg, model, info = load_image_model(run)
    steps = args.steps or info.get("steps", 20)
    sampler = args.sampler or info.get("sampler", "ddim")
    classes = info.get("num_classes", 10)  # a tuned model is sampled in the contexts it was tuned on
    labels = torch.arange(args.n) % classes if cfg.class_conditional and classes else None
    if labels is None and args.guidance != 1.0:
        raise ValueError(f"--guidance {args.guidance} needs class labels, but {run} samples unconditionally "
                         "(an unconditional model, or one tuned with num_classes=0)")
    try:
        x = sample_images(model, args.n, cfg.size, steps, sampler, labels=labels, guidance=args.guidance,
                          generator=torch.Generator().manual_seed(args.seed))
    except ValueError as e:  # an unknown sampler, a bad step count
        print(f"error: {e}", file=sys.stderr)
        return 2
    png = Path(args.out) if args.out else run / "samples.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    torch.save(x, png.with_suffix(".pt"))
    from PIL import Image

    tile = image_grid(x, cols=10)
    Image.fromarray(((tile + 1) * 127.5).round().byte().numpy()).resize((tile.shape[1] * 4, tile.shape[0] * 4),
                                                                         Image.NEAREST).save(png)
    what = info.get("method", cfg.family) + (f" at step {info['step']}" if "step" in info else "")
    kind = "unconditional" if labels is None else "class 0" if classes == 1 else f"classes 0-{classes - 1}"
    print(f"{args.n} samples of {what} ({sampler}, {steps} steps, {kind}) -> {png}")
    return 0


@dataclasses.dataclass
class ImageFinetuneRun:
    reward: str = "brightness"      # class, brightness, contrast, compressibility, incompressibility
    target_class: int = 0           # class: the digit asked for when sampling unconditionally (num_classes=0);
                                    # conditional samples are asked for their own label
    iterations: int = 100           # tuner iterations (one batch of samples each)
    checkpoint_every: int = 10


def _image_finetune(args, run) -> int:
    import json
    from pathlib import Path

    from diffpolicy.agents import image_tuner_class
    from diffpolicy.config import load_sections
    from diffpolicy.images import load_pretrained
    from diffpolicy.images.rewards import make_reward

    cls = image_tuner_class(args.method)
    conf = load_sections({"agent": cls.config_class, "run": ImageFinetuneRun}, args.config, args.overrides)
    t_cfg, model, step = load_pretrained(args.source)
    run_cfg = conf["run"]
    reward = make_reward(run_cfg.reward, **({"target": run_cfg.target_class} if run_cfg.reward == "class" else {}))
    tuner = cls(model, reward, t_cfg.size, conf["agent"])
    before = tuner.evaluate(256, seed=1)["reward_mean"]
    tuner.fit(conf["run"].iterations, run_dir=run, progress=args.progress, checkpoint_every=conf["run"].checkpoint_every)
    after = tuner.evaluate(256, seed=1)["reward_mean"]
    record = {"kind": "tuned", "method": args.method, "reward": conf["run"].reward,
              "source_run": str(Path(args.source).resolve()), "source_step": step,
              "teacher_config": json.loads(json.dumps(dataclasses.asdict(t_cfg), default=list)),
              "sampler": "ddim" if tuner.config.eta == 0 else "ddpm", "steps": tuner.config.sampling_steps,
              "num_classes": tuner.config.num_classes,  # the contexts it was tuned on (0: unconditional only)
              "reward_before": before, "reward_after": after}
    (run / "model.json").write_text(json.dumps(record, indent=1))
    print(f"{args.method} on {conf['run'].reward}: reward {before:.4f} -> {after:.4f} "
          f"({tuner.samples(conf['run'].iterations)} samples) -> {run}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (argparse stops a positional list at the first option)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from gymnasium.error import Error as GymError

    from diffpolicy.checkpoint import CheckpointError
    from diffpolicy.config import ConfigError
    from diffpolicy.envs.datasets import DatasetCorruptError, DatasetNotFoundError, NonFiniteDataError
    from diffpolicy.runlog import RunInUseError

    try:  # what the user gave (ids, keys, files, a busy run directory) is reported in one line, exit status 2
        return _run(args)
    except (ConfigError, CheckpointError, DatasetNotFoundError, DatasetCorruptError, NonFiniteDataError,
            FileNotFoundError, ValueError, GymError, RunInUseError) as e:
        return _error(e)


def _run(args) -> int:
    commands = {"train": _train_command, "finetune": _finetune_command, "eval": _eval_command,
                "compare": _compare_command, "dataset": _dataset_command, "image": _image_command}
    if args.command in commands:
        return commands[args.command](args)
    if args.command == "demo":
        from diffpolicy.story import run_story

        run_story(args.out, quick=args.quick, progress=args.progress)
    elif args.command == "toy-demo":
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)}
        if args.quick:  # shorter budgets, except where the user chose a value
            quick = dict(train_steps=200, ct_steps=200, n_eval=500, n_held_out=5000, n_paired=2)
            defaults = DemoConfig()
            values.update({k: v for k, v in quick.items() if values[k] == getattr(defaults, k)})
        run_demo(DemoConfig(**values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
