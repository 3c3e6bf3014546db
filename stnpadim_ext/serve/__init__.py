"""`stnpadim serve`: an HTTP scoring service with dynamic batching (the "serve" extra).

    batcher.py   queue, batch formation, the model thread (asyncio + one thread; no HTTP)
    scoring.py   the model side: decode an upload, score a batch, draw heatmaps and masks
    metrics.py   Prometheus metrics
    app.py       the FastAPI routes, limits and error answers
    server.py    binding, uvicorn, signals, start / stop lines

Only batcher.py and scoring.py import without FastAPI, uvicorn and prometheus-client.
"""
