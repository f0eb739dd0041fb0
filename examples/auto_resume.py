"""Automatic resume after a crash: `load_state("latest")` first thing, plus a launcher that restarts.

The script crashes on purpose once (at --crash-at-step, only in a run that started fresh); the launcher
restarts the workers, `load_state("latest")` finds the last checkpoint and training continues from there,
with the same data order, random state and step counters as if nothing had happened.

    distrib launch --num-processes 2 --max-restarts 1 examples/auto_resume.py --crash-at-step 30
    torchrun --nproc-per-node 2 --max-restarts 1 examples/auto_resume.py --crash-at-step 30
    python examples/auto_resume.py --crash-at-step 30; python examples/auto_resume.py   # by hand

Remove --project-dir's folder to start over.
"""

from __future__ import annotations

import argparse
import os

import torch
from _common import classification_data, small_model
from torch.utils.data import DataLoader

import distrib
from distrib import backward, distributed, load_state, prepare, save_state


def main(args: argparse.Namespace) -> None:
    with distributed(project_dir=args.project_dir, total_limit=2, seed=0) as ctx:
        model = small_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loader = DataLoader(classification_data(1024), batch_size=16, shuffle=True)
        model, optimizer, loader = prepare(model, optimizer, loader)

        resumed = load_state("latest")  # distrib: None on a fresh start, else the checkpoint loaded
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # set by distrib launch / torchrun
        if resumed is not None:
            distrib.print(f"attempt {attempt}: resumed from {resumed.name}")
        else:
            distrib.print(f"attempt {attempt}: starting fresh")

        for _ in range(loader.epoch, args.epochs):
            for x, y in loader:
                backward(torch.nn.functional.cross_entropy(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
                step = ctx.state.optimizer_steps
                if step % args.save_every == 0:
                    save_state()  # distrib: atomic, so a crash never leaves a broken checkpoint
                if resumed is None and step == args.crash_at_step:
                    raise RuntimeError(f"deliberate crash at step {step} (rank {ctx.rank})")
        distrib.print(f"finished at step {ctx.state.optimizer_steps}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--project-dir", default="runs/auto-resume-example")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--crash-at-step", type=int, default=-1, help="crash once, in a fresh run")
    main(parser.parse_args())
