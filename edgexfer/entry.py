"""The `edgexfer` console script: the command tree of edgexfer/cli.py (click), the runtime's commands with the
training ones added. It starts on a board with the runtime install alone (no torch): the runtime's commands
(bench, predict, serve, bundle, compare, verify) run, and the training commands say which extra they need in
one line. Without the training package's modules, the runtime's tree alone (runtime/cli.py)."""
from __future__ import annotations

import os
import sys


def main(argv=None) -> None:
    # PyTorch's OpenMP threads spin between parallel regions by default; when the cores are shared (another
    # job, a server, CI) that spinning made training several times slower here (an observation, not kept by a
    # benchmark script). Sleeping waits cost little on an idle machine.
    # Set before torch is imported; OMP_WAIT_POLICY=ACTIVE in the environment keeps spinning.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import click  # noqa: F401
    except ImportError as e:  # click is a base dependency; an install without it is broken
        print(f"error: edgexfer's commands need {e.name or 'click'}: pip install click", file=sys.stderr)
        sys.exit(1)
    try:
        from edgexfer.cli import main as tree_main  # the full tree
    except ModuleNotFoundError as e:
        if e.name != "edgexfer.cli":
            raise
        from edgexfer.runtime.cli import main as tree_main  # the runtime's tree alone
    tree_main(argv)


if __name__ == "__main__":
    main()
