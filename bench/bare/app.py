"""The bare app: the generated service's probe and example route, with nothing around them.

No middleware, no logging, no settings object: what FastAPI and gunicorn cost by themselves.
"""

from typing import Annotated

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel


class Liveness(BaseModel):
    status: str


class ServiceInfo(BaseModel):
    name: str
    version: str
    environment: str


async def get_environment(request: Request) -> str:
    environment: str = request.app.state.environment
    return environment


app = FastAPI()
app.state.environment = "production"


@app.get("/health/live", response_model=Liveness)
async def live() -> Liveness:
    return Liveness(status="ok")


@app.get("/api/v1/info", response_model=ServiceInfo)
async def info(environment: Annotated[str, Depends(get_environment)]) -> ServiceInfo:
    # A dependency like the generated route's settings (async, as the template's are).
    return ServiceInfo(name="my-service", version="0.1.0", environment=environment)
