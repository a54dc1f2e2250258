"""The ``visitflow`` console script: one sub-command per service or task.

Sub-command modules are imported only when chosen, so ``visitflow idp`` does not pay for
importing Prefect.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ['COMMANDS', 'main']

#: name -> (module with add_arguments/run, help)
COMMANDS = {
    "idp": ("visitflow.token_service.cli", "run the dev OIDC token service (or rotate its key)"),
    "tiled-config": ("visitflow.tiled.cli", "print a Tiled server config using our auth"),
    "tiled": ("visitflow.tiled.cli", "run a Tiled server with our authenticator and access policy"),
    "up": ("visitflow.stack.cli", "start the local stack (IdP, Tiled, Prefect server + worker); reuses a running one"),
    "down": ("visitflow.stack.cli", "stop what `visitflow up` started"),
    "status": ("visitflow.stack.cli", "say what runs where"),
    "demo": ("visitflow.stack.demo", "run the seed's story end to end (starts the stack if needed)"),
    "provision": ("visitflow.production.provision", "create a session list's Tiled containers, Prefect limits and OPA bundle (idempotent)"),
    "grants-sweep": ("visitflow.production.grant_hygiene", "delete (and revoke) delegation grants whose runs ended or expired"),
    "trigger": ("visitflow.trigger.cli", "start an analysis of an existing run by hand, with your own token"),
    "check": ("visitflow.flow.check", "check analyses without servers: post, live (random batches), resume"),
    "new-analysis": ("visitflow.flow.scaffold", "write flows/NAME.py, its deployments and its test"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="visitflow", description="Authenticated analysis workflows for bluesky scans.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_)
        sp.set_defaults(_module=module, _name=name)
    # Parse the command name first, then let its module define its own flags.
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    sp = argparse.ArgumentParser(prog=f"visitflow {name}", description=COMMANDS[name][1])
    adder = getattr(module, f"add_{name.replace('-', '_')}_arguments", None) or module.add_arguments
    runner = getattr(module, f"run_{name.replace('-', '_')}", None) or module.run
    adder(sp)
    return runner(sp.parse_args(argv[1:])) or 0


if __name__ == "__main__":
    sys.exit(main())
