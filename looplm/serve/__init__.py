"""``looplm serve``: an OpenAI-compatible HTTP server with continuous batching (needs the
``looplm[serve]`` extra: fastapi, uvicorn, pydantic, prometheus-client).

``engine.py`` schedules and decodes, ``api.py`` is the FastAPI app, ``protocol.py`` the request
and response bodies, ``template.py`` chat messages to a prompt, ``metrics.py`` Prometheus
metrics, ``command.py`` the subcommand, ``static/chat.html`` the chat page at ``/``.
"""
