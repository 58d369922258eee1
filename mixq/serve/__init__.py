"""`mixq serve`: an OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI + uvicorn).

`worker` owns the Engine on one thread; `app` holds the HTTP routes; `protocol` the request bodies; `errors` the
OpenAI error shape; `metrics` the Prometheus series; `server` binds and runs it; `static/chat.html` the chat page.
"""
