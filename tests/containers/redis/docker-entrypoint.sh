#!/bin/sh
# The parts of the official image's entry point that compose.yaml relies on.
set -eu
if [ "${1#-}" != "$1" ]; then set -- redis-server "$@"; fi
if [ "$1" = redis-server ] && [ "$(id -u)" = 0 ]; then
    find . \! -user redis -exec chown redis '{}' +
    exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi
if [ "$1" = redis-server ]; then
    # The official image is built with protected mode off (other containers reach it on the
    # compose network, without a password); later arguments still win.
    shift
    set -- redis-server --protected-mode no "$@"
fi
exec "$@"
