"""HTTP serving through Ray Serve (`pip install -e ".[serve]"`, `moeray serve`).

    config.py            ServeConfig / ServiceConfig (pydantic, YAML; also the `serve deploy` args)
    openai_api.py        OpenAI request models, strict validation, errors
    openai_responses.py  OpenAI response models, usage, logprobs, SSE framing
    core.py              EngineLoop (the one engine thread), RequestStream, stream deltas, chat templates, port check
    deployment.py        the Ray Serve deployment: FastAPI routes, one Engine per replica, run_service, app_builder
    placement_report.py  GET /v1/placement
"""
