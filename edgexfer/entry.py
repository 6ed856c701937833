"""The `edgexfer` console script. It must start on a board with the runtime install alone (no click,
no torch): the runtime's commands (bench, predict, serve, bundle, compare, verify) then run by themselves, and the training
commands say which extra they need."""
from __future__ import annotations

import os
import sys

from edgexfer.runtime.cli import COMMANDS as RUNTIME_COMMANDS


def main(argv=None) -> None:
    # PyTorch's OpenMP threads spin between parallel regions by default; when the cores are shared (another
    # job, a server, CI) that spinning made training 5-10x slower here (measured: 9.4 s vs 0.9 s per
    # EfficientNet-Lite0 batch of 32 on 2 busy cores). Sleeping waits cost little on an idle machine.
    # Set before torch is imported; OMP_WAIT_POLICY=ACTIVE in the environment keeps spinning.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
