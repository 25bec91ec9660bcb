#!/bin/sh
# Install wrk (Debian's package) when it is missing and we may; otherwise the benchmark falls back
# to its Python load generator (bench/pyload.py), which it says in its output.
command -v wrk >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get install -y -qq wrk >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq wrk >/dev/null 2>&1; }
fi
command -v wrk >/dev/null 2>&1 || echo "bench: wrk is not installed; using the Python load generator"
exit 0
