"""Run by a generated project's Python (`python native_telemetry_probe.py PACKAGE`): with a tracer,
meter and logger provider configured globally, as an OpenTelemetry distribution or operator would,
two requests through the app; prints the kinds of provider FastAPI asked for anything (JSON)."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from typing import Any

import httpx
from opentelemetry import _logs, metrics, trace

asked: set[str] = set()


class Tracers(trace.TracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        asked.add("tracer")
        return trace.NoOpTracer()


class Meters(metrics.MeterProvider):
    def get_meter(self, name: str, *args: Any, **kwargs: Any) -> metrics.Meter:
        asked.add("meter")
        return metrics.NoOpMeter(name)


class Loggers(_logs.LoggerProvider):
    def get_logger(self, name: str, *args: Any, **kwargs: Any) -> _logs.Logger:
        asked.add("logger")
        return _logs.NoOpLogger(name)


async def main(package: str) -> None:
    trace.set_tracer_provider(Tracers())
    metrics.set_meter_provider(Meters())
    _logs.set_logger_provider(Loggers())
    app = importlib.import_module(f"{package}.main").create_app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        for path in ("/health/live", "/api/v1/info"):
            response = await client.get(path)
            assert response.status_code == 200, (path, response.text)
    print(json.dumps(sorted(asked)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
