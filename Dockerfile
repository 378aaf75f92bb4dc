# The fibrpc server image. compose.yaml builds it; by hand:
#
#   docker build -t fibrpc .
#   docker run --rm -e FIBRPC_URL=amqp://user:pw@broker:5672/%2F fibrpc
#
# The image runs `fibrpc serve --workers auto`; any other fibrpc command replaces the CMD
# (`docker run --rm fibrpc call 30`). tests/test_compose.py checks that ENTRYPOINT and CMD
# stay a valid fibrpc invocation.
FROM python:3.11-slim

# NUMBA_CACHE_DIR: where numba keeps the machine code of the `iter` kernels. Without it,
# numba writes next to kernels.py in site-packages (owned by root) or under $HOME (the
# runtime user has none); with it, the cache warmed below is found at every start.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/var/cache/fibrpc/numba

# A system user with no home and no login shell, which owns nothing but numba's cache.
RUN useradd --system --user-group --uid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin fibrpc \
    && install -d -o fibrpc -g fibrpc "$NUMBA_CACHE_DIR"

# Install the package (pika, numba, gmpy2 and click come as wheels: no compiler needed),
# then drop the sources: the image runs the installed copy.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fibrpc ./fibrpc
RUN pip install . && rm -rf /src
WORKDIR /

# Compile the numba kernels now, as the runtime user, so that a container starts in
# milliseconds instead of compiling first. numba keys its cache on the CPU: on a host with
# a different CPU the first start compiles again, into the container's own layer, which
# this user may write.
USER fibrpc
RUN python -c "from fibrpc import kernels; kernels.warm()"

# SIGTERM drains: workers stop taking requests, answer what they hold, and the server
# exits 0 (within --drain-timeout, 30 s by default, plus 5 s). Give `docker stop` more
# than that: `docker stop -t 45`, or compose.yaml's stop_grace_period.
STOPSIGNAL SIGTERM

# Exec form, so that fibrpc itself receives the stop signal (a shell would swallow it).
ENTRYPOINT ["fibrpc"]
CMD ["serve", "--workers", "auto"]
