"""The ``steerl`` command line: one entry point, one subcommand per operator task.

    steerl train --config FILE             robot server + learner + actor: a training session
    steerl robot-server --config FILE      run the process that owns the robot
    steerl learner --config FILE           run the learner (replay, SAC/RLPD, checkpoints)
    steerl actor --config FILE             run the actor (robot PC) against a running learner
    steerl policy-server --policy DIR      serve a policy's actions to actors over ZeroMQ (GPU box)
    steerl eval --checkpoint DIR           success rate of a trained policy
    steerl deploy --config FILE --policy SPEC   run a policy on the robot (optionally V-GPS-steered)
    steerl dashboard --config FILE         the operator console: a web page to watch, steer and deploy
    steerl record-demos --config FILE -n N record scripted-expert demonstrations
    steerl record-success-fail --config FILE --episodes N --out DIR   labelled frames for a reward classifier
    steerl train-reward-classifier --data DIR --out FILE           train the reward classifier
    steerl train-bc --demos DIR --out DIR [--config FILE]         behaviour cloning: a diffusion policy
    steerl train-calql --data DIR --out DIR [--session CONFIG]    offline Cal-QL critic and actor
    steerl rollout --config FILE           drive the robot with a scripted or random policy
    steerl keys generate --dir DIR --name NAME   make a CURVE key pair
    steerl check --config FILE             pre-flight: reach and measure every device, no motion

``--config`` takes a YAML path or the name of a bundled config (``sim_panda_reach``,
``sim_panda_pick_cube``). ``steerl COMMAND --help`` explains each command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
from pathlib import Path

from hardware_configs.loader import ConfigError
from hardware_configs.schema import DEFAULT_CONFIG, SessionConfig, load_config

log = logging.getLogger("steerl")


def _setup_logging(level: str) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=level.upper(), format="%(name)s: %(message)s", datefmt="[%X]",
                        handlers=[RichHandler(show_path=False, rich_tracebacks=False)])


def _with_address(config: SessionConfig, address: str | None) -> SessionConfig:
    if not address:
        return config
    return dataclasses.replace(config, server=dataclasses.replace(config.server, address=address),
                               env=dataclasses.replace(config.env, address=address))


def cmd_robot_server(args: argparse.Namespace) -> int:
    from robot_server.server import RobotServer

    config = _with_address(load_config(args.config), args.address)
    server = RobotServer(config)
    server.install_signal_handlers()
    server.serve_forever()
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    from actor.rollout import run_rollout

    config = _with_address(load_config(args.config), args.address)
    if args.inproc:
        config = dataclasses.replace(config, env=dataclasses.replace(config.env, connection="inproc"))
    if args.realtime:
        robot = dataclasses.replace(
            config.robot, control=dataclasses.replace(config.robot.control, mode="realtime"))
        config = dataclasses.replace(config, robot=robot)
    return run_rollout(config, episodes=args.episodes, policy=args.policy,
                       start_server=not args.no_server, config_source=args.config)


def _training_config(args: argparse.Namespace) -> SessionConfig:
    config = _with_address(load_config(args.config), getattr(args, "address", None))
    learner_address = getattr(args, "learner_address", None)
    if learner_address:
        config = dataclasses.replace(config, learner=dataclasses.replace(config.learner, address=learner_address))
    if getattr(args, "env_id", None):
        # The config's observation keys name robot fields; a gymnasium env has its own.
        config = dataclasses.replace(config, learner=dataclasses.replace(config.learner, observation_keys=()))
    return config


def _with_teleop(config: SessionConfig, teleop: str | None) -> SessionConfig:
    """``--teleop`` overrides ``actor.teleop`` (checked now: a bad name or file is a config error)."""
    if teleop is None:
        return config
    if teleop:
        from hardware_configs.teleop import load_teleop_config

        load_teleop_config(teleop)
    return dataclasses.replace(config, actor=dataclasses.replace(config.actor, teleop=teleop))


def _with_warm_start(config: SessionConfig, args: argparse.Namespace) -> SessionConfig:
    """``--warm-start`` / ``--warmup-steps`` override ``learner.warm_start`` (WSRL, learner/wsrl.py)."""
    settings = config.learner.warm_start
    changes: dict = {}
    if args.warm_start:
        changes["checkpoint"] = str(Path(args.warm_start).resolve())  # as the run's records will name it
    if args.warmup_steps is not None:
        changes["warmup_steps"] = args.warmup_steps
    if changes:
        settings = dataclasses.replace(settings, **changes)
        if not settings.enabled:
            raise ConfigError("--warmup-steps: needs a warm start (--warm-start CKPT or learner.warm_start.checkpoint)")
        try:
            settings.validate()
        except ValueError as error:
            raise ConfigError(f"learner.warm_start: {error}") from None
        config = dataclasses.replace(config, learner=dataclasses.replace(config.learner, warm_start=settings))
    return config


def cmd_train(args: argparse.Namespace) -> int:
    from tools.session import run_training

    config = _with_warm_start(_with_teleop(_training_config(args), args.teleop), args)
    if config.learner.warm_start.enabled and not args.resume:  # a resumed run reads its own checkpoints
        from learner.wsrl import check_warm_start

        check_warm_start(config.learner.warm_start, config.learner.sac)  # before the children start
    if config.learner.algorithm == "parl" and not args.resume:  # before the children start
        from policies.base import read_policy_file

        try:
            read_policy_file(config.learner.parl.base_policy)
        except (OSError, ValueError, KeyError) as error:
            raise ConfigError(f"learner.parl.base_policy: {error}") from None
    if args.save_videos < 0:
        print(f"steerl train: --save-videos must be 0 or positive, got {args.save_videos}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or f"{config.learner.run_dir}/{config.name}"
    config = _with_ray(config, args)
    if config.ray.enabled:
        if args.env_id or args.save_videos or args.dashboard or args.console:
            print("steerl train --ray: --env-id, --save-videos, --dashboard and --console are for single-actor "
                  "sessions", file=sys.stderr)
            return 2
        from tools.ray_session import run_ray_training

        return run_ray_training(config, run_dir, args.steps, demos=args.demos, resume=args.resume)
    return run_training(config, run_dir, args.steps, demos=args.demos, resume=args.resume, env_id=args.env_id,
                        save_videos=args.save_videos, with_console=args.console, with_dashboard=args.dashboard)


def _with_ray(config: SessionConfig, args: argparse.Namespace) -> SessionConfig:
    """``--ray`` / ``--ray-address`` / ``--actors`` override the ``ray`` section (validated again)."""
    overrides = {}
    if args.ray or args.ray_address is not None or args.actors is not None:
        overrides["enabled"] = True
    if args.ray_address is not None:
        overrides["address"] = args.ray_address
    if args.actors is not None:
        overrides["num_actors"] = args.actors
    if not overrides:
        return config
    settings = dataclasses.replace(config.ray, **overrides)
    try:
        settings.validate()
    except ValueError as error:
        raise ConfigError(f"ray: {error}") from None
    return dataclasses.replace(config, ray=settings)


def cmd_learner(args: argparse.Namespace) -> int:
    import signal

    from learner.learner import Learner

    config = _with_warm_start(_training_config(args), args)
    learner = Learner(config, args.run_dir or f"{config.learner.run_dir}/{config.name}", resume=args.resume,
                      demos=args.demos)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: learner.stop())
    learner.run(max_updates=args.max_updates)
    return 0


def cmd_actor(args: argparse.Namespace) -> int:
    from contextlib import ExitStack

    from rich.console import Console

    from tools.session import attach_reward_classifier, attach_teleop, open_console, open_env, run_actor

    config = _with_warm_start(_with_teleop(_training_config(args), args.teleop), args)
    console = Console()
    actor_id = args.actor_id or f"actor-{config.name}"
    with ExitStack() as stack:
        env = open_env(config, args.env_id, stack, start_server=False)
        stack.callback(env.close)
        env = attach_teleop(config, attach_reward_classifier(config, env, console), console)
        if hasattr(env, "device"):
            stack.callback(env.device.close)
        operator_console = open_console(config, stack, actor_id, args.steps) if args.console else None
        run_actor(config, env, args.steps, actor_id=actor_id, console=console, operator_console=operator_console)
    return 0


def cmd_policy_server(args: argparse.Namespace) -> int:
    from hardware_configs.schema import PolicyServerConfig
    from learner.policy_server import PolicyServer

    server_config = load_config(args.config).learner.policy_server if args.config else PolicyServerConfig()
    overrides = {"address": args.address, "batch_wait_ms": args.batch_wait_ms, "max_batch_size": args.max_batch_size}
    server_config = dataclasses.replace(server_config, **{k: v for k, v in overrides.items() if v is not None})
    try:
        server_config.validate()
    except ValueError as error:
        print(f"steerl policy-server: learner.policy_server: {error}", file=sys.stderr)
        return 2
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        server = PolicyServer.from_directory(args.policy, server_config, device=device, name=args.name or "",
                                             instruction_key=args.instruction_key)
    except (FileNotFoundError, ValueError) as error:
        print(f"steerl policy-server: {error}", file=sys.stderr)
        return 2
    server.install_signal_handlers()
    server.serve_forever()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tools.session import run_evaluation

    config = _training_config(args)
    result = run_evaluation(config, args.checkpoint, args.episodes, env_id=args.env_id, seed=args.seed)
    print(f"success rate {result['success_rate']:.0%} over {result['episodes']} episodes "
          f"(mean return {result['mean_return']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def cmd_record_demos(args: argparse.Namespace) -> int:
    from tools.session import record_demos

    config = _training_config(args)
    out = args.out or f"demos/{config.name}"
    if args.clean_episodes < 0:
        print(f"steerl record-demos: --clean-episodes must be 0 or more, got {args.clean_episodes}", file=sys.stderr)
        return 2
    result = record_demos(config, args.episodes, out, keep_failures=args.keep_failures, noise_std=args.noise,
                          clean_episodes=args.clean_episodes)
    print(f"recorded {result['episodes']} episodes ({result['transitions']} transitions, "
          f"{result['attempted']} attempted) into {result['path']}")
    return 0


def cmd_record_success_fail(args: argparse.Namespace) -> int:
    from actor.labelled_frames import SimCollection, record_success_fail

    config = _with_address(load_config(args.config), args.address)
    if args.inproc:
        config = dataclasses.replace(config, env=dataclasses.replace(config.env, connection="inproc"))
    settings = SimCollection(expert_share=args.expert_share, expert_noise=args.expert_noise,
                             random_action_share=args.random_action_share, near_miss_steps=args.near_miss_steps,
                             failures_per_episode=args.failures_per_episode, max_episode_steps=args.max_episode_steps)
    try:
        settings.validate()
    except ValueError as error:
        print(f"steerl record-success-fail: {error}", file=sys.stderr)
        return 2
    result = record_success_fail(config, args.episodes, args.out, settings, seed=args.seed,
                                 start_server=not args.no_server, log_line=print)
    print(f"recorded {result['frames']} frames ({result['success']} success, {result['failure']} failure) "
          f"from {result['episodes']} episodes into {result['path']}")
    return 0


def cmd_train_reward_classifier(args: argparse.Namespace) -> int:
    from actor.labelled_frames import LabelledFramesError, concatenate_labelled_frames, load_labelled_frames
    from learner.reward_classifier import (RewardClassifierError, TrainingOptions, describe_metrics,
                                           save_reward_classifier, train_reward_classifier)

    if args.encoder == "pretrained" and not args.pretrained_path:
        print("steerl train-reward-classifier: --encoder pretrained needs --pretrained-path (a TorchScript file)",
              file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = TrainingOptions(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                              holdout_fraction=args.holdout, seed=args.seed, encoder=args.encoder,
                              pretrained_path=args.pretrained_path or "", freeze_encoder=not args.train_encoder,
                              augment_pad=args.augment_pad, threshold=args.threshold)
    try:
        data = concatenate_labelled_frames([load_labelled_frames(path) for path in args.data])
        result = train_reward_classifier(data, options, log_line=print)
    except (LabelledFramesError, RewardClassifierError) as error:
        print(f"steerl train-reward-classifier: {error}", file=sys.stderr)
        return 2
    training = {"options": dataclasses.asdict(options), "data": [str(path) for path in args.data],
                **result.summary()}
    path = save_reward_classifier(result.classifier, args.out, training)
    if result.heldout is not None:
        print(f"held-out {describe_metrics(result.heldout)}")
    print(f"saved the reward classifier to {path} ({result.seconds:.1f} s of training)")
    return 0


def cmd_train_bc(args: argparse.Namespace) -> int:
    import torch

    from learner.replay import ReplayFormatError
    from policies.diffusion import DiffusionPolicyConfig, load_diffusion_config, train_diffusion_policy

    if args.steps < 1:
        print(f"steerl train-bc: --steps must be at least 1, got {args.steps}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_diffusion_config(args.config) if args.config else DiffusionPolicyConfig()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")

    def progress(step: int, loss: float) -> None:
        print(f"step {step}/{args.steps}  loss {loss:.4f}", flush=True)

    try:
        policy = train_diffusion_policy(config, args.demos, args.steps, seed=args.seed, device=device,
                                        log_every=args.log_every, progress=progress)
    except (ReplayFormatError, FileNotFoundError, KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error  # no repr quotes
        print(f"steerl train-bc: {message}", file=sys.stderr)
        return 2
    policy.info["demos"] = str(args.demos)
    policy.save(args.out)
    print(f"saved the diffusion policy to {args.out} ({policy.info['demo_episodes']} episodes, "
          f"{policy.info['demo_steps']} steps of demonstrations)")
    return 0


def cmd_train_calql(args: argparse.Namespace) -> int:
    from learner.calql import main as calql_main

    return calql_main(args.arguments)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from tools.dashboard import DashboardRefused, serve

    config = load_config(args.config)
    try:
        serve(config, host=args.host, port=args.port, token=args.token, runs_dir=args.runs_dir,
              config_source=str(args.config))
    except DashboardRefused as error:
        print(f"steerl dashboard: {error}", file=sys.stderr)
        return 2
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from tools.deploy import load_deploy_policy, run_deployment

    config = _with_teleop(_with_address(load_config(args.config), args.address), args.teleop)
    if args.episodes < 1:
        print(f"steerl deploy: --episodes must be at least 1, got {args.episodes}", file=sys.stderr)
        return 2
    if args.vgps_critic is None and (args.k is not None or args.beta is not None):
        print("steerl deploy: --k and --beta steer with a critic: give --vgps-critic too", file=sys.stderr)
        return 2
    try:
        policy, name = load_deploy_policy(config, args.policy, args.vgps_critic,
                                          10 if args.k is None else args.k, 1.0 if args.beta is None else args.beta)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        print(f"steerl deploy: cannot load the policy: {error}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or f"{config.learner.run_dir}/deploy-{config.name}"
    run_deployment(config, policy, name, args.episodes, run_dir, deterministic=args.deterministic,
                   start_server=not args.no_server, with_console=args.console, with_dashboard=args.dashboard)
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from transport.zmq_link import generate_keypair

    public, secret = generate_keypair(args.dir, args.name)
    print(f"public key: {public}\nsecret key: {secret} (keep it on this machine; never in a config)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tools.preflight import config_error_report, print_report, run_preflight

    if not args.measure_s > 0:
        print(f"steerl check: --measure-s must be positive, got {args.measure_s}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"steerl: config error: {error}", file=sys.stderr)
        report = config_error_report(args.config, error)
    else:
        report = run_preflight(config, measure_s=args.measure_s)
    print_report(report, Console())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return 0 if report.passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    server = commands.add_parser(
        "robot-server", help="run the robot server (owns the robot; safety, watchdog, control clock)",
        description="Run the process that owns the robot: it binds server.address, enforces the "
                    "workspace box, per-step limits and watchdog, and serves one controlling client "
                    "at a time until SIGINT/SIGTERM.")
    server.add_argument("--config", required=True, help="YAML file or bundled config name")
    server.add_argument("--address", help="override server.address (and env.address)")
    server.set_defaults(handler=cmd_robot_server)

    rollout = commands.add_parser(
        "rollout", help="run episodes with a scripted or random policy, with live progress",
        description="Start a robot server for the config (unless --no-server), connect an actor "
                    "over ZeroMQ and run episodes with the scripted expert or random actions, "
                    "showing progress and success rate.")
    rollout.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML file or bundled name (default {DEFAULT_CONFIG})")
    rollout.add_argument("--episodes", type=int, default=20)
    rollout.add_argument("--policy", choices=["scripted", "random"], default="scripted")
    rollout.add_argument("--address", help="override server.address and env.address")
    rollout.add_argument("--no-server", action="store_true", help="connect to a robot server already running")
    rollout.add_argument("--inproc", action="store_true", help="run the robot cell inside this process")
    rollout.add_argument("--realtime", action="store_true", help="pace steps at the control rate")
    rollout.set_defaults(handler=cmd_rollout)

    def training_options(sub: argparse.ArgumentParser, default_config: bool = True) -> None:
        if default_config:
            sub.add_argument("--config", default=DEFAULT_CONFIG,
                             help=f"YAML file or bundled config name (default {DEFAULT_CONFIG})")
        else:
            sub.add_argument("--config", required=True, help="YAML file or bundled config name")
        sub.add_argument("--address", help="override server.address and env.address (the robot server)")
        sub.add_argument("--learner-address", help="override learner.address")
        sub.add_argument("--env-id", help="train on a registered gymnasium env (Id-v0 or module:Id-v0) in-process "
                                          "instead of the robot of the config")

    def warm_start_options(sub: argparse.ArgumentParser) -> None:
        # The actor never reads the checkpoint: a warm start makes it act with the learner's first
        # (pre-trained) weights from its first step, without random steps.
        sub.add_argument("--warm-start", metavar="CKPT",
                         help="WSRL: start from this offline checkpoint (steerl train-calql output or any learner "
                              "checkpoint or run directory), act with its policy from the first step and fine-tune "
                              "online without its data (overrides learner.warm_start.checkpoint)")
        sub.add_argument("--warmup-steps", type=int, metavar="N",
                         help="with a warm start: env steps collected with the pre-trained policy before the first "
                              "update (overrides learner.warm_start.warmup_steps)")

    train = commands.add_parser(
        "train", help="run a training session: robot server + learner + actor, with live progress",
        description="Start the robot server and the learner as child processes and act in the foreground, "
                    "showing env steps, learner updates/s, episode return and success rate. Checkpoints, "
                    "TensorBoard logs and summary.json go to the run directory.")
    training_options(train)
    train.add_argument("--steps", type=int, default=30_000, help="env steps to collect")
    train.add_argument("--run-dir", help="default: learner.run_dir/<config name>")
    train.add_argument("--demos", help="a demo buffer made by 'steerl record-demos'")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    train.add_argument("--teleop", metavar="NAME_OR_YAML",
                       help="teleop device for interventions and operator events: keyboard, gamepad_xbox, "
                            "spacemouse, simulated_operator or a YAML path (overrides actor.teleop)")
    train.add_argument("--save-videos", type=int, default=0, metavar="N",
                       help="save every N-th episode's camera images as MP4 into RUN_DIR/videos (0: none)")
    train.add_argument("--ray", action="store_true",
                       help="run the learner and ray.num_actors simulated actors as Ray actors (a local Ray instance "
                            "unless --ray-address); the same ZeroMQ data path (overrides ray.enabled)")
    train.add_argument("--ray-address", metavar="ADDRESS",
                       help="join this running Ray cluster (auto, or HOST:PORT) instead of starting one (implies --ray)")
    train.add_argument("--actors", type=int, metavar="N", help="simulated actors under Ray (implies --ray)")
    train.add_argument("--dashboard", action="store_true",
                       help="serve the operator console (a web page on dashboard.host:port) for this session")
    train.add_argument("--console", action="store_true",
                       help="publish to and take buttons from an operator console already running "
                            "(steerl dashboard); --dashboard starts one")
    warm_start_options(train)
    train.set_defaults(handler=cmd_train)

    learner = commands.add_parser(
        "learner", help="run the learner: receives transitions, trains, publishes weights, checkpoints",
        description="Bind learner.address, build the agent when the first actor says hello, train with the "
                    "configured UTD ratio and write checkpoints; SIGINT/SIGTERM write a final checkpoint.")
    training_options(learner)
    learner.add_argument("--run-dir", help="default: learner.run_dir/<config name>")
    learner.add_argument("--demos", help="a demo buffer made by 'steerl record-demos'")
    learner.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    learner.add_argument("--max-updates", type=int, help="stop after this many updates")
    warm_start_options(learner)
    learner.set_defaults(handler=cmd_learner)

    actor = commands.add_parser(
        "actor", help="run the actor against a running robot server and learner",
        description="Connect to the robot server (env.address) and the learner (learner.address) and act for "
                    "--steps env steps, shipping transitions and swapping in new weights between steps.")
    training_options(actor)
    actor.add_argument("--steps", type=int, default=30_000)
    actor.add_argument("--actor-id", help="stable name of this actor (default actor-<config name>)")
    warm_start_options(actor)
    actor.add_argument("--teleop", metavar="NAME_OR_YAML",
                       help="teleop device for interventions and operator events: keyboard, gamepad_xbox, "
                            "spacemouse, simulated_operator or a YAML path (overrides actor.teleop)")
    actor.add_argument("--console", action="store_true",
                       help="publish to and take buttons from the operator console (run steerl dashboard beside it)")
    actor.set_defaults(handler=cmd_actor)

    dashboard = commands.add_parser(
        "dashboard", help="serve the operator console: live cameras, buttons, plots, sessions, checkpoints",
        description="Serve a web page (FastAPI + uvicorn, WebSockets) that shows the actor's camera views, "
                    "action, intervention state, episode plots, learner updates/s and the robot's safety state; "
                    "its buttons send the same operator events as the keyboard or gamepad (success, failure, "
                    "re-record, pause, emergency stop, resume); it starts and stops sessions and evaluates "
                    "checkpoints. Bound to loopback unless --host; beyond loopback a token is required.")
    dashboard.add_argument("--config", default=DEFAULT_CONFIG,
                           help=f"YAML file or bundled config name (default {DEFAULT_CONFIG}): its dashboard section, "
                                "and the robot server an emergency stop is sent to")
    dashboard.add_argument("--host", help="override dashboard.host (beyond loopback needs a token)")
    dashboard.add_argument("--port", type=int, help="override dashboard.port")
    dashboard.add_argument("--token", help="the page's token (default: dashboard.token or $STEERL_DASHBOARD_TOKEN)")
    dashboard.add_argument("--runs-dir", help="where checkpoints are listed and sessions write "
                                              "(default: dashboard.runs_dir or learner.run_dir)")
    dashboard.set_defaults(handler=cmd_dashboard)

    deploy = commands.add_parser(
        "deploy", help="run a trained or generalist policy on the robot, optionally V-GPS-steered",
        description="Run a policy through the robot server with the same safety, teleop override and operator "
                    "console as training, recording every episode (RUN_DIR/episodes.jsonl, RUN_DIR/transitions) "
                    "and the success rate (RUN_DIR/deploy_summary.json).")
    deploy.add_argument("--config", required=True, help="YAML file or bundled config name")
    deploy.add_argument("--policy", required=True,
                        help="a policy directory (policy.json), a learner checkpoint, a run directory or best_policy")
    deploy.add_argument("--vgps-critic", metavar="CKPT",
                        help="steer with V-GPS: a critic directory or a learner / Cal-QL checkpoint")
    deploy.add_argument("--k", type=int, help="V-GPS: actions sampled per step (default 10)")
    deploy.add_argument("--beta", type=float, help="V-GPS: softmax temperature over Q (0: argmax; default 1)")
    deploy.add_argument("--episodes", type=int, default=10)
    deploy.add_argument("--deterministic", action="store_true", help="the policy's deterministic action")
    deploy.add_argument("--run-dir", help="default: learner.run_dir/deploy-<config name>")
    deploy.add_argument("--address", help="override server.address and env.address (the robot server)")
    deploy.add_argument("--no-server", action="store_true", help="connect to a robot server already running")
    deploy.add_argument("--teleop", metavar="NAME_OR_YAML", help="teleop device (overrides actor.teleop)")
    deploy.add_argument("--dashboard", action="store_true", help="serve the operator console for this deployment")
    deploy.add_argument("--console", action="store_true", help="publish to an operator console already running")
    deploy.set_defaults(handler=cmd_deploy)

    policy_server = commands.add_parser(
        "policy-server", help="serve a policy's actions to actors over ZeroMQ (for policies that need a GPU)",
        description="Load a policy directory (policy.json + weights, any registered kind: sac, diffusion, openvla...) "
                    "and answer actors' action requests on learner.policy_server.address, batching requests that "
                    "arrive together into one sample call, until SIGINT/SIGTERM. Actors use it with "
                    "actor.policy_source: remote. Binding beyond loopback needs CURVE keys "
                    "(learner.policy_server.curve in --config).")
    policy_server.add_argument("--policy", required=True, help="policy directory (written by Policy.save)")
    policy_server.add_argument("--config", help="YAML file or bundled config name whose learner.policy_server "
                                                "section to use (default: that section's defaults)")
    policy_server.add_argument("--address", help="override learner.policy_server.address")
    policy_server.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                               help="where the policy runs (default: cuda when available)")
    policy_server.add_argument("--batch-wait-ms", type=float, help="override learner.policy_server.batch_wait_ms")
    policy_server.add_argument("--max-batch-size", type=int, help="override learner.policy_server.max_batch_size")
    policy_server.add_argument("--name", help="the policy's name in replies and logs (default: the directory name)")
    policy_server.add_argument("--instruction-key", default="instruction",
                               help="observation key of the instruction the policy reads (default: instruction)")
    policy_server.set_defaults(handler=cmd_policy_server)

    evaluate = commands.add_parser(
        "eval", help="success rate of a checkpoint's deterministic policy",
        description="Load the policy of a checkpoint (or a run directory's latest) and report its success "
                    "rate over N episodes, starting a robot server for the config unless --env-id is given.")
    training_options(evaluate)
    evaluate.add_argument("--checkpoint", required=True,
                          help="checkpoint directory, run directory (its newest checkpoint) or RUN_DIR/best_policy")
    evaluate.add_argument("--episodes", type=int, default=50)
    evaluate.add_argument("--seed", type=int, help="seed of the episode seeds (default: the config's seed); "
                                                   "use one the training run did not use for held-out episodes")
    evaluate.add_argument("--json", help="also write the result to this JSON file")
    evaluate.set_defaults(handler=cmd_eval)

    demos = commands.add_parser(
        "record-demos", help="record scripted-expert demonstrations into a replay buffer on disk",
        description="Run the scripted expert of the config's task and save N successful episodes as a replay "
                    "buffer (learner/replay.py format) for 'steerl train --demos'.")
    training_options(demos)
    demos.add_argument("-n", "--episodes", type=int, default=20)
    demos.add_argument("--out", help="output directory (default demos/<config name>)")
    demos.add_argument("--keep-failures", action="store_true", help="keep unsuccessful episodes too")
    demos.add_argument("--noise", type=float, default=0.0, help="Gaussian noise std added to the expert's actions")
    demos.add_argument("--clean-episodes", type=int, default=0, metavar="N",
                       help="also record N noise-free successful episodes into the same buffer (mixed-quality data)")
    demos.set_defaults(handler=cmd_record_demos)

    check = commands.add_parser(
        "check", help="pre-flight check: reach every device of a config and measure it, before any motion",
        description="Connect to the arm and every camera device of the config without moving anything "
                    "(no reset, no command), and report as a table: the workspace box against the reset "
                    "pose and its randomisation, the arm's state and TCP, each camera's delivered fps and "
                    "frame age, the control-loop jitter at robot.control.rate_hz, the CURVE key files and "
                    "the learner address. Exit status 0 when no check fails, 1 otherwise.")
    check.add_argument("--config", required=True, help="YAML file or bundled config name")
    check.add_argument("--measure-s", type=float, default=2.0,
                       help="seconds of camera and control-loop measurement (default 2)")
    check.add_argument("--json", help="also write the report to this JSON file")
    check.set_defaults(handler=cmd_check)

    success_fail = commands.add_parser(
        "record-success-fail", help="record camera frames labelled success/failure (simulator) for a reward classifier",
        description="Drive the simulated robot with the scripted expert mixed with noise and random actions, and "
                    "save camera frames labelled with the simulator's success flag: every success frame, the "
                    "near-misses just before it and a few other failure frames per episode (actor/labelled_frames.py "
                    "format). On a real robot, frames are labelled by operator marks instead.")
    success_fail.add_argument("--config", required=True, help="YAML file or bundled config name (needs cameras)")
    success_fail.add_argument("--episodes", type=int, default=100)
    success_fail.add_argument("--out", required=True, help="output directory")
    success_fail.add_argument("--expert-share", type=float, default=0.6,
                              help="share of episodes driven by the (noisy) expert; the others explore (default 0.6)")
    success_fail.add_argument("--expert-noise", type=float, default=0.1, help="Gaussian noise std on expert actions")
    success_fail.add_argument("--random-action-share", type=float, default=0.5,
                              help="in exploring episodes, share of steps with a uniform random action (default 0.5)")
    success_fail.add_argument("--near-miss-steps", type=int, default=2,
                              help="failure frames kept right before each success (default 2)")
    success_fail.add_argument("--failures-per-episode", type=int, default=2,
                              help="further failure frames drawn per episode (default 2)")
    success_fail.add_argument("--max-episode-steps", type=int, help="end episodes earlier than the task's time limit")
    success_fail.add_argument("--seed", type=int, help="default: the config's seed")
    success_fail.add_argument("--address", help="override server.address and env.address")
    success_fail.add_argument("--no-server", action="store_true", help="connect to a robot server already running")
    success_fail.add_argument("--inproc", action="store_true", help="run the robot cell inside this process")
    success_fail.set_defaults(handler=cmd_record_success_fail)

    classifier = commands.add_parser(
        "train-reward-classifier", help="train the image reward classifier on labelled frames",
        description="Train a binary success classifier (frozen image encoder + small MLP head, balanced batches, "
                    "DrQ shift) on frames from 'steerl record-success-fail' or operator marks, report held-out "
                    "accuracy, precision, recall and the confusion matrix (split by episode), and save it as "
                    "safetensors with a JSON header (learner/reward_classifier.py).")
    classifier.add_argument("--data", required=True, nargs="+", metavar="DIR", help="labelled-frame directories")
    classifier.add_argument("--out", required=True, metavar="FILE", help="classifier file (.safetensors)")
    classifier.add_argument("--encoder", choices=["small_cnn", "pretrained"], default="small_cnn",
                            help="small_cnn (default: random-initialised, frozen) or a frozen TorchScript backbone")
    classifier.add_argument("--pretrained-path", help="TorchScript backbone file for --encoder pretrained")
    classifier.add_argument("--train-encoder", action="store_true",
                            help="small_cnn: train the convolutions too instead of freezing them")
    classifier.add_argument("--steps", type=int, default=500)
    classifier.add_argument("--batch-size", type=int, default=64, help="even; half success, half failure frames")
    classifier.add_argument("--lr", type=float, default=1e-3)
    classifier.add_argument("--holdout", type=float, default=0.2,
                            help="share of episodes held out for evaluation (0: none; default 0.2)")
    classifier.add_argument("--augment-pad", type=int, help="DrQ shift in pixels (default 5%% of the image side)")
    classifier.add_argument("--threshold", type=float, default=0.5, help="success when p >= threshold (default 0.5)")
    classifier.add_argument("--seed", type=int, default=0)
    classifier.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 on a busy machine)")
    classifier.set_defaults(handler=cmd_train_reward_classifier)

    bc = commands.add_parser(
        "train-bc", help="behaviour cloning: train a diffusion policy on recorded demonstrations",
        description="Train a diffusion policy (action chunks conditioned on an observation history, DDIM/DDPM "
                    "sampling, EMA weights; policies/diffusion.py) on a demo buffer from 'steerl record-demos' and "
                    "save it as a policy directory (policy.json + model.safetensors) that load_policy reads.")
    bc.add_argument("--config", help="YAML file of DiffusionPolicyConfig fields (default: the defaults)")
    bc.add_argument("--demos", required=True, help="a demo buffer directory made by 'steerl record-demos'")
    bc.add_argument("--out", required=True, help="output policy directory")
    bc.add_argument("--steps", type=int, default=20_000, help="gradient steps (default 20000)")
    bc.add_argument("--seed", type=int, default=0)
    bc.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    bc.add_argument("--log-every", type=int, default=500, help="print the mean loss every N steps (default 500)")
    bc.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    bc.set_defaults(handler=cmd_train_bc)

    # Cal-QL owns its options (learner/calql.py builds the parser); everything after the command goes there.
    calql = commands.add_parser("train-calql", add_help=False,
                                help="offline Cal-QL: a conservative, calibrated critic and actor from saved buffers")
    calql.add_argument("arguments", nargs=argparse.REMAINDER)
    calql.set_defaults(handler=cmd_train_calql)

    keys = commands.add_parser("keys", help="manage CURVE keys",
                               description="Manage the CURVE keys that authenticate robot links.")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    generate = key_commands.add_parser(
        "generate", help="write NAME.key (public) and NAME.key_secret into DIR",
        description="Write a CURVE key pair: NAME.key (public; copy it to the peer) and "
                    "NAME.key_secret (secret; stays on this machine, mode 600).")
    generate.add_argument("--dir", required=True)
    generate.add_argument("--name", required=True)
    generate.set_defaults(handler=cmd_keys_generate)
    return parser


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C, so that a session's child processes (robot server, learner) are
    # stopped by their context managers instead of being orphaned. Commands that serve (learner,
    # robot-server, policy-server) install their own graceful handlers over this one.
    signal.signal(signal.SIGTERM, _interrupt)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "handler", None) is cmd_train_calql:
        args.arguments = unknown + args.arguments  # options the Cal-QL parser owns
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    _setup_logging(args.log_level)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"steerl: config error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
