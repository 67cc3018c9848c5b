"""The simulated GPU: a roofline cost model and vLLM's scheduler, for CPU machines and large benchmarks.

- ``profiles``: GPU datasheets and model shapes;
- ``roofline``: pure cost functions (KV capacity, step times, service times, capacity estimates);
- ``scheduler``: ``BatchScheduler``, a pure discrete-event model of vLLM's scheduler on one GPU;
- ``engine``: ``SimEngine``, the Engine that runs the scheduler against the wall clock.
"""

from dio.gpu_worker.sim.engine import SimEngine
from dio.gpu_worker.sim.profiles import get_model, get_profile

__all__ = ["SimEngine", "get_model", "get_profile"]
