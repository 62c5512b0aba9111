"""The ``steerl`` command line: one entry point, one subcommand per operator task.

    steerl robot-server --config FILE      run the process that owns the robot
    steerl rollout --config FILE           drive the robot with a scripted or random policy
    steerl keys generate --dir DIR --name NAME   make a CURVE key pair

``--config`` takes a YAML path or the name of a bundled config (``sim_panda_reach``,
``sim_panda_pick_cube``). ``steerl COMMAND --help`` explains each command.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

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


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from transport.zmq_link import generate_keypair

    public, secret = generate_keypair(args.dir, args.name)
    print(f"public key: {public}\nsecret key: {secret} (keep it on this machine; never in a config)")
    return 0


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
