"""Benchmarks and the training demo of sharpopt (not part of the installed package).

* ``python -m bench [--quick]`` — one optimizer step, every provider side by side
  (``bench/__main__.py``; workloads in ``workloads.py``, baselines in ``providers.py``,
  table / JSON / PNG in ``report.py``);
* ``pytest bench/`` — pytest-benchmark timings of each backend pass (``test_passes.py``);
* ``python -m bench.demo [--quick]`` — training on scikit-learn's bundled digits and
  breast-cancer sets: accuracy over seeds, time per epoch, optimizer-step time per backend.
"""
