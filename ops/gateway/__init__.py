"""``dio gateway``: DIO behind an OpenAI-compatible HTTP API (FastAPI on uvicorn).

The gateway holds no state of its own (every job, file and batch lives in Redis), so any number of
them can run behind a load balancer. One module per concept:

* ``app`` builds the ASGI app (``create_app``); ``server`` runs it on uvicorn (``run``);
* ``settings`` (``GatewaySettings``: ``DIO_GATEWAY_*``, ``DIO_API_KEYS``), ``auth`` (API keys);
* ``params`` (OpenAI request bodies → DIO requests), ``completions`` (``/v1/completions`` and
  ``/v1/chat/completions``), ``choices`` (waiting for and streaming the jobs of one request),
  ``stops`` (``stop`` sequences), ``bodies`` (OpenAI response objects and stream chunks), ``sse``;
* ``catalog`` (``/v1/models`` and the model check, from the worker registry), ``health``
  (``/health``, ``/ready``), ``batch_routes`` (``/v1/files``, ``/v1/batches``);
* ``errors`` (OpenAI's error shape and the one table from DIO outcomes to HTTP statuses),
  ``limits`` (request body size), ``hooks`` (no-op observer hooks: where metrics plug in).

FastAPI, uvicorn and python-multipart come with the ``server`` extra (``pip install 'dio[server]'``).
"""
