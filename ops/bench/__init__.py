"""``dio bench``: benchmarks that compare DIO's routing with the baselines and measure its own cost.

One module per benchmark — ``replay`` (trace replay through the whole system), ``overload``,
``convergence`` (predictor error against completions), ``decision`` (cost of one routing
decision) and ``pipeline`` (requests per second with an instant engine, against RQ) — over shared
pieces: ``workload`` (traces, capacity, SLOs), ``openloop`` (submit on schedule, collect),
``cluster_run`` (one run on a fresh local cluster), ``calibrate``, ``metrics``, ``cpu``, ``plots``,
``report`` (the JSON result files under ``ops/bench/results/``) and ``summary`` (their headline
tables as Markdown). ``cli`` holds the ``dio bench`` commands; ``README.md`` the results.
"""
