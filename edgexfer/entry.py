"""The `edgexfer` console script. It must start on a board with the runtime install alone (no click,
no torch): the runtime's commands (bench, predict, serve, bundle, compare, verify) then run by themselves, and the training
commands say which extra they need."""
from __future__ import annotations

import sys

from edgexfer.runtime.cli import COMMANDS as RUNTIME_COMMANDS


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        import click  # noqa: F401
    except ImportError:
        if args and args[0] in RUNTIME_COMMANDS:
            from edgexfer.heldout import test_split
            from edgexfer.runtime.cli import main as runtime_main

            return runtime_main(args, held_out=test_split)
        if args and args[0] not in ("-h", "--help"):
            print(f"error: `edgexfer {args[0]}` needs the training toolchain: pip install 'edgexfer[train]' "
                  f"(this install has the runtime commands: {', '.join(RUNTIME_COMMANDS)})", file=sys.stderr)
            sys.exit(1)
        from edgexfer.runtime.cli import parser

        parser().print_help()
        return
    from edgexfer.cli import main as cli_main

    cli_main(args)


if __name__ == "__main__":
    main()
