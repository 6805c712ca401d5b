"""gunicorn settings of the bare app: the generated gunicorn.conf.py's server settings, one worker.

No logging configuration and no access log (gunicorn's and uvicorn's access loggers get no
handler), so the bare app writes nothing per request.
"""

from pathlib import Path

wsgi_app = "app:app"
worker_class = "uvicorn_worker.UvicornWorker"
workers = 1
timeout = 30
graceful_timeout = 30
keepalive = 75
max_requests = 10000
max_requests_jitter = 1000
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
forwarded_allow_ips = "127.0.0.1"
proxy_allow_ips = forwarded_allow_ips
worker_tmp_dir = "/dev/shm" if Path("/dev/shm").is_dir() else None
control_socket_disable = True
accesslog = None
errorlog = "-"
loglevel = "info"
