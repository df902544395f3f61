"""The OpenAI-compatible HTTP server: one engine thread (`engine_loop`), the FastAPI app
(`app`), request schemas (`protocol`), Prometheus metrics (`metrics`) and the uvicorn
runner (`server`)."""
