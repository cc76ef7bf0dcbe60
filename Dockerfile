# ferry's own image: the CLI (deploy, reconcile, gateway, watch, exporter, ...) on Python 3.11.
#   docker build -t ferry:0.1.0 .                                          # gateway, watch, exporter, reconcile, Jobs
#   docker build --build-arg FERRY_EXTRAS=airflow,s3 -t ferry-airflow:0.1.0 .  # Airflow's KubernetesExecutor tasks
# The versions are the ones the tests run (constraints.txt). It runs as an unprivileged user (10001),
# the one deploy/ runs every ferry container as.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG FERRY_EXTRAS=gateway,s3
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
RUN python -m venv /opt/ferry \
    && /opt/ferry/bin/pip install -c constraints.txt ".[${FERRY_EXTRAS}]" \
    && /opt/ferry/bin/pip check

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 ferry \
    && useradd --uid 10001 --gid 10001 --home-dir /home/ferry --create-home --shell /usr/sbin/nologin ferry \
    && install -d -o 10001 -g 10001 /var/lib/ferry /models
COPY --from=build /opt/ferry /opt/ferry
COPY dags /opt/ferry/dags
ENV PATH=/opt/ferry/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FERRY_HOME=/var/lib/ferry \
    FERRY_REPOSITORY=/models
USER 10001:10001
WORKDIR /home/ferry
ENTRYPOINT ["ferry"]
CMD ["--help"]
