"""Evaluation after a task: every seen task's test set through the method's `predict`, into accuracy matrices."""

from __future__ import annotations

import torch

from norga.methods.base import ContinualMethod, ImageIds, PredictRequest
from norga.metrics import AccuracyMatrix
from norga.runtime.context import RunContext
from norga.runtime.features import FeatureSet

NO_TASK = -1  # a method that infers no task


@torch.inference_mode()
def evaluate_seen_tasks(context: RunContext, method: ContinualMethod, task: int, batch_size: int,
                        accuracy: AccuracyMatrix, identity: AccuracyMatrix | None = None,
                        within_task: AccuracyMatrix | None = None, slots: str = "predicted") -> None:
    """Column `task` of the matrices: accuracy on the test set of every task seen after learning `task` (all
    tasks in a joint run), in batches of `batch_size`, with the prompts `slots` names.

    `identity` (the task-identity matrix) is given for methods that infer tasks, outside joint runs;
    `within_task` (task-incremental accuracy: each image's true task given) outside joint runs.
    """
    if slots not in method.slot_modes:
        raise ValueError(f"method {method.name!r} has no slots={slots!r}: it has {', '.join(method.slot_modes)}")
    context.model.eval()
    for seen in range(accuracy.tested(task)):
        frozen = context.frozen_test_features(seen)

        def predict(images: torch.Tensor, labels: torch.Tensor, rows: slice,
                    seen: int = seen, frozen: FeatureSet = frozen) -> tuple[torch.Tensor, ...]:
            ids = ImageIds(("test", seen), torch.arange(rows.start, rows.stop), len(frozen.labels))
            true_tasks = torch.full_like(labels, seen) if within_task is not None else None
            prediction = method.predict(PredictRequest(images, task + 1, frozen.features[rows], ids, slots, true_tasks))
            if prediction.tasks is None and identity is not None:
                raise RuntimeError(f"method {method.name!r} infers tasks but its predict returned none")
            if prediction.within_task is None and within_task is not None:
                raise RuntimeError(f"method {method.name!r} was given the true tasks but predicted no within-task "
                                   "classes")
            missing = torch.full_like(labels, NO_TASK)
            return (prediction.classes, missing if prediction.tasks is None else prediction.tasks,
                    missing if prediction.within_task is None else prediction.within_task, labels)

        classes, tasks, within, labels = context.map_batches(context.test_tasks[seen].test, batch_size, predict)
        accuracy.update(seen, task, int((classes == labels).sum()), len(labels))
        if identity is not None:
            identity.update(seen, task, int((tasks == seen).sum()), len(labels))
        if within_task is not None:
            within_task.update(seen, task, int((within == labels).sum()), len(labels))
