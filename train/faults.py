"""Fault injection, for `citytrain bench-restart` and tests/test_elastic.py:

    torchrun ... -m train.faults --kill-rank 1 --after-step 7 fit --out RUN ... --resume auto

runs `citytrain fit ...`, and rank 1 of torchrun's first attempt SIGKILLs itself right after
its optimizer step 7, as a GPU falling off the bus or the OOM killer ends a process: no
signal handler runs and nothing is saved. In the attempts torchrun restarts nothing is
injected; their rank 0 says when it has trained its first step and when it is back at the
step of the kill, the times `citytrain bench-restart` reads the cost of the kill from.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path


def _say(text: str) -> None:
    print(f"train.faults: {text} at {time.time():.3f}", file=sys.stderr, flush=True)


def arm(rank: int, after_step: int, out: Path | None = None) -> None:
    """Make this process SIGKILL itself after `after_step` training steps, if it is `rank`
    of torchrun's first attempt; in a restarted attempt, time rank 0's way back to
    `after_step` (from the checkpoint in `out` it resumes)."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    me = int(os.environ.get("RANK", 0))
    if not ((attempt == 0 and me == rank) or (attempt > 0 and me == 0)):
        return
    from train import engine

    back = after_step  # steps this attempt takes to be where the first one was killed
    if attempt > 0 and out is not None and (out / "checkpoints" / "last.pt").is_file():
        from train.checkpoint import load_checkpoint

        back -= load_checkpoint(out / "checkpoints" / "last.pt")["step"]
    real, steps = engine.train_step, [0]

    def train_step(*args, **kwargs):
        loss = real(*args, **kwargs)
        steps[0] += 1
        if attempt == 0 and steps[0] == after_step:
            _say(f"rank {rank} SIGKILLs itself after step {after_step}")
            os.kill(os.getpid(), signal.SIGKILL)
        if attempt > 0 and steps[0] in (1, back):
            loss.item()  # the step is done, not queued
            if steps[0] == 1:
                _say(f"attempt {attempt} trained its first step")
            if steps[0] == back:
                _say(f"attempt {attempt} is back at step {after_step}")
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
        out = Path(command[command.index("--out") + 1]) if "--out" in command else None
        arm(args.kill_rank, args.after_step, out)
    from train.cli import main as citytrain

    citytrain(command)


if __name__ == "__main__":  # spawned loader workers import this module again: only then
    main(sys.argv[1:])
