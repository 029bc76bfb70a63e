"""Skin-lesion triage web service: a thin FastAPI layer over the exported model artifact."""

import os

# NumPy's OpenBLAS spreads even a [1, 768] x [768, 768] product over every core and then
# spin-waits; beside the model runtime's own thread pool that made the OOD gate 10-20x slower
# under load (measured: 9.5 ms → 1.0 ms for one photo, 67 ms → 3 ms for four). The gates'
# small products run single-threaded; concurrent requests supply the parallelism. Set here,
# before NumPy is first imported by ``python -m app``; an operator's own value wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "1.0.0"
