"""Continual benchmarks: data sources, seeded class orders and task splits, the official transforms."""

from norga.data.benchmark import (
    BENCHMARKS,
    SOURCES,
    ContinualBenchmark,
    Task,
    build_benchmark,
    check_benchmark_data,
    known_benchmarks,
    locate,
    subsample_per_class,
)
from norga.data.datasets import ImageDataset, SourceData
from norga.data.errors import (
    BenchmarkOptionError,
    DataError,
    DataLayoutError,
    DatasetNotFoundError,
    UnreadableImageError,
)
from norga.data.fivedatasets import dataset_order
from norga.data.loader import make_loader
from norga.data.split_manifest import (
    make_split_manifest,
    read_manifest,
    verify_manifest,
    write_manifest,
)
from norga.data.splits import class_order, split_into_tasks
from norga.data.transforms import backbone_input, build_transforms

__all__ = [
    "BENCHMARKS", "SOURCES", "BenchmarkOptionError", "ContinualBenchmark", "DataError", "DataLayoutError",
    "DatasetNotFoundError", "ImageDataset", "SourceData", "Task", "UnreadableImageError",
    "backbone_input", "build_benchmark", "build_transforms", "check_benchmark_data", "class_order", "dataset_order", "known_benchmarks",
    "locate", "make_loader", "make_split_manifest", "read_manifest", "split_into_tasks", "subsample_per_class",
    "verify_manifest", "write_manifest",
]
