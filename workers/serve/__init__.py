"""``lookalike serve``: the HTTP front door — a JSON API under ``/v1`` and a web page at ``/``.

One long-running process answers image, text and id queries, accepts uploads that become searchable at
once, and serves the page people use. Its pieces, in dependency order (each imports only those above it):

    settings   ServeSettings: host/port, API key, CORS, limits, micro-batching (extends WorkerSettings)
    metrics    the Prometheus registry of one app: requests, latencies, embedding, store, uploads
    batching   MicroBatcher: requests that arrive together are embedded in one model call
    thumbs     thumbnails of stored points, read through the safe reader and decoder, cached by content
    service    Service: the model, the store, the pipeline for uploads, readiness — no HTTP in it
    api        create_app(): the FastAPI app (routers, auth, limits, error shapes, the page)
    cli        the ``serve`` command (uvicorn)

Deployments: with the embedded store, one ``serve`` process owns the store and ingests uploads (and
``--watch`` folders) in-process; with a Qdrant server (``LOOKALIKE_QDRANT_URL``) and a broker, any number of
stateless replicas run beside any number of workers and uploads become live events.
"""
