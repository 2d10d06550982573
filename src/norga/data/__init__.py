"""Continual benchmarks: data sources, seeded class orders and task splits, the official transforms."""

from norga.data.benchmark import SOURCES, ContinualBenchmark, DatasetNotFoundError, Task, build_benchmark, locate
from norga.data.datasets import ImageDataset, UnreadableImageError
from norga.data.splits import class_order, split_into_tasks
from norga.data.transforms import build_transforms

__all__ = ["SOURCES", "ContinualBenchmark", "DatasetNotFoundError", "ImageDataset", "Task", "UnreadableImageError",
           "build_benchmark", "build_transforms", "class_order", "locate", "split_into_tasks"]
