"""The second baseline: a bare FastAPI app with the generated service's own routers.

The routers, their dependencies and response models exactly as the service has them; nothing of
the service around them: no middleware, no logging configuration, no lifespan (no connections:
the routes measured use none), no metrics server. What any FastAPI service of this shape costs,
against which the service's own layers are measured. Run from the generated project's directory
with its virtualenv (its settings come from the environment and its `.env`).
"""

from fastapi import FastAPI
from my_service.api import router as api_router
from my_service.health import router as health_router
from my_service.lifecycle import Lifecycle
from my_service.settings import load_settings

app = FastAPI()
app.state.settings = load_settings()  # what the routes' dependencies read
app.state.lifecycle = Lifecycle()
app.include_router(health_router)
app.include_router(api_router)
