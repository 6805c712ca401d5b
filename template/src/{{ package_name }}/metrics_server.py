"""The gunicorn master's side of the metrics: it serves them, and keeps them exact as workers
come and go. gunicorn.conf.py calls these from the master's hooks.

- start() (on_starting, before the first worker is forked, once PROMETHEUS_MULTIPROC_DIR names
  an empty directory): the scrape endpoint on METRICS_BIND, a thread of the master. Each scrape
  sums the workers' files (prometheus_client's MultiProcessCollector) and adds what only the
  master knows: the workers alive and wanted, and how many have been restarted.
- worker_exited() (child_exit, as the master reaps a worker, whatever ended it: SIGKILL, a
  timeout, max_requests, a reload): the dead worker's counters and histograms are added into
  one archive file per type and its files are removed; its gauges are dropped
  (mark_process_dead). Totals never go backwards, and the directory holds the live workers'
  files and the archives, however many workers have come and gone: left alone, dead workers'
  files pile up and every scrape reads them all.
- stop() (on_exit): the endpoint closes and the directory is emptied.

The endpoint is a port of its own, not a path of the service: the service's port is what nginx
(or an Ingress) exposes, and under systemd it is a unix socket Prometheus cannot scrape; on its
own port the metrics are reachable only where METRICS_BIND listens, and a scrape costs the
workers nothing (the master reads their files).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

# The types whose values are sums over the processes: what a dead worker counted stays counted.
_SUMMED = ("counter", "histogram", "summary")


class MasterMetrics:
    """The metrics directory and the master's own figures; one per master."""

    def __init__(self, arbiter: Any, directory: Path) -> None:
        self.arbiter = arbiter
        self.directory = directory
        # A scrape and the folding of a dead worker never overlap: a scrape in between would
        # count that worker twice (archive and its own file) or not at all.
        self.lock = threading.Lock()
        self.archives: dict[str, MmapedDict] = {}
        self.restarts = 0
        # Workers the master stops itself (a reload, TTOU): their exits are no restarts.
        self.retired: set[int] = set()

    def collect(self) -> Iterable[Metric]:
        with self.lock:
            files = [str(path) for path in self.directory.glob("*.db")]
            metrics = list(MultiProcessCollector.merge(files, accumulate=True))
        return [
            *metrics,
            GaugeMetricFamily(
                "gunicorn_workers", "Worker processes alive.", value=len(self.arbiter.WORKERS)
            ),
            GaugeMetricFamily(
                "gunicorn_workers_wanted",
                "Worker processes the master keeps running.",
                value=self.arbiter.num_workers,
            ),
            CounterMetricFamily(
                "gunicorn_worker_restarts",
                "Worker processes that exited on their own and were replaced: crashes, kills, "
                "timeouts, max_requests recycling (not the workers a reload, TTOU or the "
                "master's shutdown stops).",
                value=self.restarts,
            ),
        ]

    def retiring(self, pids: Iterable[int]) -> None:
        """Workers the master is about to stop itself (a reload, TTOU)."""
        with self.lock:
            self.retired.update(pids)

    def worker_exited(self, pid: int, stopping: bool = False) -> None:
        """Fold a reaped worker's files; a restart unless the master stopped it (a reload or
        TTOU it was told of, or the master's own shutdown: `stopping`)."""
        with self.lock:
            if pid in self.retired:
                self.retired.discard(pid)
            elif not stopping:
                self.restarts += 1
            mark_process_dead(pid, str(self.directory))
            for path in self.directory.glob(f"*_{pid}.db"):
                kind = path.name.split("_", 1)[0]
                if kind in _SUMMED:
                    archive = self.archives.get(kind)
                    if archive is None:
                        archive = MmapedDict(str(self.directory / f"{kind}_archive.db"))
                        self.archives[kind] = archive
                    for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
                        archive.write_value(key, archive.read_value(key)[0] + value, 0.0)
                path.unlink()  # other gauges too: a dead worker's gauge describes nothing

    def close(self) -> None:
        with self.lock:
            for archive in self.archives.values():
                archive.close()
            for path in self.directory.glob("*.db"):
                path.unlink()


_master: MasterMetrics | None = None
_server: Any = None


def start(arbiter: Any, directory: Path, bind: str) -> None:
    """Serve the metrics of the workers writing to directory on bind (host:port), in a thread;
    SystemExit naming METRICS_BIND when it cannot listen there."""
    global _master, _server
    _master = MasterMetrics(arbiter, directory)
    registry = CollectorRegistry()
    registry.register(_master)
    host, _, port = bind.rpartition(":")
    try:
        _server, _ = start_http_server(int(port), host.strip("[]"), registry)
    except OSError as exc:
        raise SystemExit(f"METRICS_BIND={bind}: cannot listen there: {exc.strerror}") from None


def retiring(pids: Iterable[int]) -> None:
    """Workers the master is about to stop itself (a reload, TTOU): no restarts."""
    if _master is not None:
        _master.retiring(pids)


def worker_exited(pid: int, stopping: bool) -> None:
    if _master is not None:
        _master.worker_exited(pid, stopping)


def stop() -> None:
    if _server is not None:
        _server.shutdown()
        _server.server_close()
    if _master is not None:
        _master.close()
