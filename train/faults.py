"""Fault injection, for `citytrain bench-restart` and tests/test_elastic.py:

    torchrun ... -m train.faults --kill-rank 1 --after-step 7 fit --data ... --resume auto

runs `citytrain fit ...`, and rank 1 of torchrun's first attempt SIGKILLs itself right after
its optimizer step 7, as a GPU falling off the bus or the OOM killer ends a process: no
signal handler runs and nothing is saved. The attempts torchrun restarts run untouched.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def arm(rank: int, after_step: int) -> None:
    """Make this process SIGKILL itself after `after_step` training steps, if it is `rank`
    of torchrun's first attempt."""
    if int(os.environ.get("RANK", 0)) != rank \
            or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) != 0:
        return
    from train import engine

    real, steps = engine.train_step, [0]

    def train_step(*args, **kwargs):
        loss = real(*args, **kwargs)
        steps[0] += 1
        if steps[0] == after_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return loss

    engine.train_step = train_step


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kill-rank", type=int, default=1, help="The rank to kill.")
    parser.add_argument("--after-step", type=int, default=0,
                        help="Its training steps before the SIGKILL (0: none).")
    ours = 0  # this module's options come first, then citytrain's command line
    while ours < len(argv) and argv[ours] in ("--kill-rank", "--after-step", "-h", "--help"):
        ours += 1 if argv[ours] in ("-h", "--help") else 2
    args, command = parser.parse_args(argv[:ours]), argv[ours:]
    if args.after_step > 0:
        arm(args.kill_rank, args.after_step)
    from train.cli import main as citytrain

    citytrain(command)


if __name__ == "__main__":  # spawned loader workers import this module again: only then
    main(sys.argv[1:])
