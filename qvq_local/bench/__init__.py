"""``qvq bench``: the benchmark harness, kept out of the runtime's import path.

Nothing under ``qvq_local`` outside this package imports it except the ``qvq bench`` command body (a
lazy import), so ``import qvq_local``, ``qvq ask`` and the API never load it.

* ``harness``: the parts of a run (options, machine, bandwidth, model preparation, one backend's
  measurements, outputs) and ``run_bench``/``bench_command`` that put them in order;
* ``worker``: one measured job in a child process (``python -m qvq_local.bench.worker SPEC OUT``);
* ``bandwidth``: memory bandwidth and the decode speed it bounds;
* ``memory``: peak resident memory of a process;
* ``stats``: the median and spread of repeated runs, and qvq/raw ratios of paired runs;
* ``mmproj``: a vision projector's image embeddings against transformers, and its encode time;
* ``report``: Rich tables, the JSON file and the chart.
"""

from __future__ import annotations

from qvq_local.bench.harness import bench_command, run_bench

__all__ = ["bench_command", "run_bench"]
