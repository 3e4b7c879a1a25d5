"""ThinResNets next to structured pruning: published results, thin-vs-pruned comparisons.

- `literature`: the published pruning results and the ThinResNet reference counts (package
  data CSVs), validated and completed (`load_literature`, `get_benchmark`, `thin_counts`).
- `points`: what is compared: points from run directories, user CSV files, the literature, with
  measured latency attached from tools/benchmark.py result files.
- `pareto`: the thin-network Pareto curve, interpolated in log-MACs, and the margin table.
- `plots`: top-1 vs MACs / params / latency and Δ top-1 vs MAC reduction (PNG + SVG).
- `report`: all of the above for tools/compare.py.
- `prune`: structured channel pruning of a checkpoint to a target MAC count (Torch-Pruning,
  the `prune` extra), for tools/prune.py.
"""
from .literature import (Benchmark, CompareError, Literature, LiteratureError, LiteraturePoint,
                         benchmark_names, get_benchmark, load_literature, thin_counts)

__all__ = ["Benchmark", "CompareError", "Literature", "LiteratureError", "LiteraturePoint",
           "benchmark_names", "get_benchmark", "load_literature", "thin_counts"]
