"""Run by tests/test_distributed.py under torchrun (or in-process with one rank): the tiny engine fixture,
after which every process saves what it holds (matrices, class statistics, trainable state, the number of
optimizer steps taken) to OUT/rankR.pt.

    torchrun --nproc_per_node=2 tests/ddp_worker.py OUT METHOD [--resume] [--crash-at TASK,PHASE,EPOCH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, str(Path(__file__).parent))

from engine_fixtures import build, tiny_config  # noqa: E402

from norga.engine.loop import Position, open_run  # noqa: E402
from norga.runtime.distributed import (  # noqa: E402
    SINGLE_PROCESS,
    Distributed,
    init_distributed,
    shutdown_distributed,
)


class InjectedCrash(RuntimeError):
    pass


def ddp_config(method: str):
    """Odd batch sizes, so global batches split unevenly and a last training batch of one image leaves a
    process with nothing; augmented task-identity training goes through the sharded image loader."""
    odd = {"norga": {"tii.augment": True, "tii.train.batch_size": 5, "wtp.train.batch_size": 5},
           "hide": {"tii.augment": True, "tii.train.batch_size": 5, "wtp.train.batch_size": 5},
           "vptnsp": {"train.epochs": 2, "train.batch_size": 5},  # its lr schedule is its own (train.lr_drops)
           "smope": {"train.epochs": 2, "train.batch_size": 5}}  # its own schedules (coswm, coda_cosine)
    baseline = {"train.epochs": 2, "train.batch_size": 5, "train.schedule": "step"}
    trains = hasattr(tiny_config(method).settings, "train")  # ncm has no training phase
    return tiny_config(method, **{"eval.batch_size": 3, **odd.get(method, baseline if trains else {})})


def run(out: Path, method: str, dist: Distributed, resume: bool = False, crash_at: Position | None = None) -> None:
    """Run (or resume) the fixture into OUT/run and save this process's state as OUT/rank{rank}.pt."""
    config = ddp_config(method)

    def after_epoch(position: Position) -> None:
        if crash_at is not None and position == crash_at:
            raise InjectedCrash(f"injected crash at {position}")

    steps = [0]
    counter = register_optimizer_step_post_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
    try:
        engine = open_run(build(config), out / "run", resume=resume, after_epoch=after_epoch, dist=dist)
        matrices = engine.run()
    finally:
        counter.remove()
    torch.save({"matrices": {name: matrix.to_dict() for name, matrix in matrices.items()},
                "method": engine.method.state_dict(), "heavy": engine.method.heavy_state_dict(),
                "frozen_images_encoded": engine.context.frozen_images_encoded, "optimizer_steps": steps[0]},
               out / f"rank{dist.rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("method")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--crash-at", help="TASK,PHASE,EPOCH: fail right after that checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(1)
    crash = Position(*map(int, args.crash_at.split(","))) if args.crash_at else None
    dist = init_distributed("cpu")
    finished = False
    try:
        run(args.out, args.method, dist if dist.enabled else SINGLE_PROCESS, args.resume, crash)
        finished = True
    except InjectedCrash:
        sys.exit(3)
    finally:  # every rank leaves the process group (threads joined) before the interpreter exits
        shutdown_distributed(clean=finished)


if __name__ == "__main__":
    main()
