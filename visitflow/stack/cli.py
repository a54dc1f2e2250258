"""``visitflow up | down | status``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .local import LocalStack, StackConfig

__all__ = [
    'add_port_arguments', 'config_from_args', 'add_up_arguments', 'run_up', 'add_down_arguments', 'run_down',
    'add_status_arguments', 'run_status',
]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=None, help="state, logs and stack.json (default .visitflow or $VISITFLOW_STATE)")


def add_port_arguments(p: argparse.ArgumentParser) -> None:
    """The stack's loopback ports: ``up`` and ``demo`` take the same ones, so a demo can run on
    a stack started elsewhere than the defaults (a second stack, a test)."""
    p.add_argument("--idp-port", type=int, default=8180)
    p.add_argument("--tiled-port", type=int, default=8000)
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--worker-health-port", type=int, default=8182)  # not 8181: OPA's default


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    add_port_arguments(p)
    p.add_argument("--visit", action="append", default=None, help="visit containers to create (default a1 a2)")
    p.add_argument("--no-ui", action="store_true", help="Prefect server without its UI")
    p.add_argument("--worker-type", choices=["visitflow", "process"], default=None,
                   help="visitflow: warm forked flow runs (default); process: Prefect's stock worker")


def config_from_args(args) -> StackConfig:
    """The stack's config from whichever of the stack flags ``args`` has (up, down, status, demo)."""
    config = StackConfig()
    if args.state_dir:
        config.state_dir = Path(args.state_dir)
    for name in ("idp_port", "tiled_port", "prefect_port", "worker_health_port"):
        if getattr(args, name, None):
            setattr(config, name, getattr(args, name))
    if getattr(args, "visit", None):
        config.visits = tuple(args.visit)
    if getattr(args, "no_ui", False):
        config.ui = False
    if getattr(args, "worker_type", None):
        config.worker_type = args.worker_type
    return config


def run_up(args) -> int:
    stack = LocalStack(config_from_args(args))
    rec = stack.up()
    c = stack.config
    print(f"\nvisitflow is up (state in {stack.state}):\n"
          f"  IdP          {rec.issuer}\n  Tiled        {rec.tiled_uri}\n"
          f"  Prefect UI   {c.prefect_ui}   (its login asks for the auth string: cat {stack.state}/prefect-auth)\n"
          f"  Prefect API  {rec.prefect_api}   (needs it too: export PREFECT_API_AUTH_STRING=$(cat "
          f"{stack.state}/prefect-auth))\n"
          f"  next: visitflow demo   |   visitflow down")
    return 0


def add_down_arguments(p):
    _common(p)


def run_down(args) -> int:
    LocalStack(config_from_args(args)).down()
    return 0


def add_status_arguments(p):
    _common(p)


def run_status(args) -> int:
    rows = LocalStack(config_from_args(args)).status()
    if not rows:
        print("nothing started from this state directory (visitflow up)")
        return 1
    for name, state, url in rows:
        print(f"{name:15} {state:20} {url}")
    return 0 if all(state == "healthy" for _, state, _ in rows) else 1
