"""HTTP serving through Ray Serve (`pip install -e ".[serve]"`, `moeray serve`).

    config.py      ServeConfig / ServiceConfig (pydantic, YAML)
    core.py        request checks and batching without any web framework (unit-tested)
    deployment.py  the Ray Serve deployment: FastAPI routes, dynamic batching, one Engine per replica
"""
