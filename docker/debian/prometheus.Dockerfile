# Prometheus from Debian's prometheus package (2.42), for docker/compose.debian.yml:
# where the public prom/prometheus image cannot be pulled. It runs like that image: the
# server is the entrypoint (the compose file gives its flags), as nobody, data in
# /prometheus, and wget for the health check. Only the server binary is taken from the
# package: its web pages' JavaScript dependencies weigh over 200 MB, and the API, which
# is what Grafana and the tests read, needs none of them.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && apt-get download prometheus \
    && dpkg-deb --fsys-tarfile prometheus_*.deb \
        | tar -x -C /usr/bin --strip-components=3 ./usr/bin/prometheus \
    && install -d -o nobody -g nogroup /prometheus /etc/prometheus \
    && rm -rf prometheus_*.deb /var/lib/apt/lists/*

USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
