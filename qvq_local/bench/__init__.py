"""``qvq bench``: the benchmark harness, kept out of the runtime's import path.

Nothing under ``qvq_local`` outside this package imports it except the ``qvq bench`` command body (a
lazy import), so ``import qvq_local``, ``qvq ask`` and the API never load it.

* ``harness``: the options, the backends measured (the registry's local ones) and ``run_bench``/
  ``bench_command`` that put the parts below in order;
* ``machine``: the machine's description (hardware facts, the CPU's name from ``qvq_local.cpu``);
* ``bandwidth``: memory bandwidth, the bytes a token reads per model format, and the decode speed they bound;
* ``prepare``: the models: synthesised or resolved, converted to each backend's format, cached;
* ``processes``: child processes: one worker job to its end, or two served paths interleaved;
* ``worker``: the jobs a child runs (``python -m qvq_local.bench.worker SPEC OUT``, or ``--serve``);
* ``qvq_path``: qvq-local's path (``qvq_local.api.load(...).stream``), prefix reuse, the language lock's cost;
* ``raw_paths``: the raw libraries alone (mlx-vlm, llama-cpp-python), by backend, for the qvq/raw ratios;
* ``chains``: the ``--samples N`` decode rates;
* ``runs``: a path's measured runs (warm-ups dropped, peak memory per size, summaries);
* ``workload``: what every measurement asks: the question, the chart image, greedy sampling;
* ``memory``: peak resident memory of a process;
* ``stats``: the median and spread of repeated runs, and qvq/raw ratios of paired runs;
* ``mmproj``: a vision projector's image embeddings against transformers, and its encode time;
* ``report``: Rich tables, the JSON file and the chart.
"""

from __future__ import annotations

from qvq_local.bench.harness import bench_command, run_bench

__all__ = ["bench_command", "run_bench"]
