"""In-process cost of tracing per request, run by a generated project's Python (tracing on).

`python tracing_layers.py PATH` prints JSON: CPU microseconds per request through the ASGI app
(no server, no network), as bench/layers.py measures, for the generated app with tracing off
(no endpoint: no tracer), with the service's own server span (middleware.py + tracing.py), with
opentelemetry-instrumentation-asgi's OpenTelemetryMiddleware (the stock instrumentation, around
the app with the service's own span off), and with FastAPI's native telemetry (the service
turns it off; here on, its own span alone) - each unsampled (a `traceparent` with the sampled
flag off, parent-based sampler) and sampled (flag on). The sampled spans go to a
BatchSpanProcessor whose exporter drops them: the request's share. The export's own share (the
OTLP encoding in the export thread) is measured apart, per span. Variants interleaved in many
short batches; the 10th percentile of the batches is reported, and each variant's cost against
tracing off as the median of the batch-by-batch differences ("paired_cost").

`python tracing_layers.py --ours-only PATH`: tracing off and the service's own span alone
(`python -m bench.tracing --compare GIT_REF` runs it in two projects, alternately).

`--export-to URL` (an OTLP/HTTP endpoint in another process): also the CPU of the whole process
per sampled request with the service's own exporter (`tracing.exporter()`) posting every span
there, the request's thread and the export thread together, in batches of 512 (the SDK's
default) and of 64, against tracing off.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from layers import http_scope  # beside this file, which the project's Python runs as a script
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

BATCHES = 40
# Exported: rounds (alternating) of requests, each round ending with every span exported.
EXPORT_ROUNDS, EXPORT_PER_ROUND = 6, 2000
EXPORT_BATCH_SIZES = (512, 64)
PER_BATCH = 200
TRACE = "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"
# What tracing.use() sets: the tracer, what it knows of the sampler and of the SDK's spans.
_STATE = ("tracer", "_span_id_of_dropped", "_direct")


def _traceparent(sampled: bool) -> tuple[bytes, bytes]:
    return (b"traceparent", f"00-{TRACE}-{'01' if sampled else '00'}".encode())


class _Dropped(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _with_tracer(app: Any, module: Any, provider: Any) -> Any:
    """app, with the server spans made by provider's tracer (as tracing.start() sets it up) while
    it handles a request (one at a time); None: tracing off."""
    names = [name for name in _STATE if hasattr(module, name)]  # (an older version: fewer)
    module.use(provider)
    state = {name: getattr(module, name) for name in names}
    module.use(None)

    async def swapped(scope: Any, receive: Any, send: Any) -> None:
        saved = {name: getattr(module, name) for name in names}
        for name, value in state.items():
            setattr(module, name, value)
        try:
            await app(scope, receive, send)
        finally:
            state.update((name, getattr(module, name)) for name in names)  # what it learnt
            for name, value in saved.items():
                setattr(module, name, value)

    return swapped


async def _measure(variants: dict[str, tuple[Any, bool]], path: str) -> dict[str, dict[str, float]]:
    def scope(sampled: bool) -> dict[str, Any]:
        return http_scope(path, _traceparent(sampled))

    statuses: dict[str, int] = {}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    def sender(name: str) -> Any:
        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses[name] = message["status"]

        return send

    scopes = {name: scope(sampled) for name, (_, sampled) in variants.items()}

    async def one(name: str, app: Any, send: Any) -> None:
        base = scopes[name]
        await app(dict(base, headers=list(base["headers"])), receive, send)

    sends = {name: sender(name) for name in variants}
    for name, (app, _) in variants.items():
        for _ in range(50):
            await asyncio.create_task(one(name, app, sends[name]))
    bad = {name: status for name, status in statuses.items() if status != 200}
    if bad:
        raise SystemExit(f"{path}: not 200: {bad}")
    samples: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants.items())
    for batch in range(BATCHES):
        # Alternately forwards and backwards: what one variant leaves behind (garbage to
        # collect) falls on each of its neighbours in turn.
        for name, (app, _) in order if batch % 2 == 0 else order[::-1]:
            start = time.thread_time()
            for _ in range(PER_BATCH):
                await asyncio.create_task(one(name, app, sends[name]))
            samples[name].append((time.thread_time() - start) / PER_BATCH * 1e6)
    percentile = {name: sorted(values)[len(values) // 10] for name, values in samples.items()}
    # Each variant's cost against tracing off with the same header, batch by batch (the two ran
    # close together: one after the other with --ours-only, two or three batches apart
    # otherwise): the median of those differences, which a slow spell of the machine moves
    # less than the difference of two percentiles.
    paired = {}
    for name, values in samples.items():
        label = "sampled" if variants[name][1] else "unsampled"
        baseline = samples.get(f"tracing off, {label} header")
        if baseline is not None and values is not baseline:
            differences = sorted(a - b for a, b in zip(values, baseline, strict=True))
            paired[name] = differences[len(differences) // 2]
    return {"percentile": percentile, "paired": paired}


async def _exported(apps: dict[str, tuple[Any, TracerProvider | None]], path: str) -> Any:
    """CPU microseconds of the whole process per sampled request, each round's spans exported
    before it ends: the median of the rounds, for each app (and its provider)."""
    scope = http_scope(path, _traceparent(sampled=True))

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    samples: dict[str, list[float]] = {name: [] for name in apps}
    order = list(apps.items())
    for round_ in range(EXPORT_ROUNDS + 1):  # the first warms up
        for name, (app, provider) in order if round_ % 2 == 0 else order[::-1]:
            start = time.process_time()
            for _ in range(EXPORT_PER_ROUND):
                await asyncio.create_task(
                    app(dict(scope, headers=list(scope["headers"])), receive, send)
                )
            if provider is not None:
                provider.force_flush()
            if round_:
                samples[name].append((time.process_time() - start) / EXPORT_PER_ROUND * 1e6)
    return {name: sorted(values)[len(values) // 2] for name, values in samples.items()}


def _encode_cost(app_spans: list[ReadableSpan]) -> float:
    """CPU microseconds per span of the OTLP/protobuf encoding the exporter does per batch."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    batch = (app_spans * (512 // max(len(app_spans), 1) + 1))[:512]
    runs = []
    for _ in range(20):
        start = time.thread_time()
        encode_spans(batch).SerializePartialToString()
        runs.append((time.thread_time() - start) / len(batch) * 1e6)
    return sorted(runs)[len(runs) // 10]


def main() -> None:
    ours_only = "--ours-only" in sys.argv
    args = [arg for arg in sys.argv[1:] if arg != "--ours-only"]
    export_to = None
    if "--export-to" in args:
        at = args.index("--export-to")
        export_to = args[at + 1]
        del args[at : at + 2]
    paths = args
    from my_service import tracing
    from my_service.main import create_app

    sampled_provider = TracerProvider()  # parent-based, always on: the SDK's default
    sampled_provider.add_span_processor(BatchSpanProcessor(_Dropped()))
    unsampled_provider = TracerProvider()
    provider_of = {True: sampled_provider, False: unsampled_provider}

    variants: dict[str, tuple[Any, bool]] = {}
    for sampled in (False, True):
        label = "sampled" if sampled else "unsampled"
        app = create_app()
        variants[f"tracing off, {label} header"] = (_with_tracer(app, tracing, None), sampled)
        app = create_app()
        variants[f"ours, {label}"] = (_with_tracer(app, tracing, provider_of[sampled]), sampled)
        if ours_only:
            continue
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        app = create_app()
        stock = OpenTelemetryMiddleware(app, tracer_provider=provider_of[sampled])
        variants[f"stock asgi, {label}"] = (_with_tracer(stock, tracing, None), sampled)
        app = create_app()
        app._telemetry.update(tracing=True, tracer_provider=provider_of[sampled])  # type: ignore[attr-defined]
        variants[f"FastAPI native, {label}"] = (_with_tracer(app, tracing, None), sampled)

    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    measured = {path: run(_measure(variants, path)) for path in paths}
    results = {path: figures["percentile"] for path, figures in measured.items()}
    paired = {path: figures["paired"] for path, figures in measured.items()}
    if ours_only:
        print(json.dumps({"results": results, "paired_cost": paired}))
        return

    # What one sampled request of ours exports, encoded as the OTLP exporter does.
    memory = InMemorySpanExporter()
    kept = TracerProvider()
    kept.add_span_processor(SimpleSpanProcessor(memory))
    app = create_app()
    run(_measure({"kept": (_with_tracer(app, tracing, kept), True)}, paths[0]))
    spans = list(memory.get_finished_spans())[-10:]
    figures = {"results": results, "paired_cost": paired, "encode_us_per_span": _encode_cost(spans)}
    if export_to:
        import os

        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = export_to  # what tracing.exporter() reads
        exporting: dict[str, tuple[Any, TracerProvider | None]] = {
            "tracing off": (_with_tracer(create_app(), tracing, None), None)
        }
        for size in EXPORT_BATCH_SIZES:
            provider = TracerProvider()
            provider.add_span_processor(
                BatchSpanProcessor(tracing.exporter(), max_export_batch_size=size)
            )
            app = _with_tracer(create_app(), tracing, provider)
            exporting[f"sampled, batches of {size}"] = (app, provider)
        figures["exported_process_cpu_us"] = run(_exported(exporting, paths[0]))
        for _, provider in exporting.values():
            if provider is not None:
                provider.shutdown()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
