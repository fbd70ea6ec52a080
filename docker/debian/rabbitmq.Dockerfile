# RabbitMQ from Debian's rabbitmq-server package (3.10), for docker/compose.debian.yml:
# where the public rabbitmq image cannot be pulled. It runs like that image: the node is
# rabbit@<hostname>, data in /var/lib/rabbitmq, configuration from /etc/rabbitmq/conf.d/,
# /etc/rabbitmq/enabled_plugins and the definitions broker_config/ names, logs to stdout.
# The package ships the management, MQTT and Prometheus plugins.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# The user first, with the public image's uid and gid (999), so the package keeps it.
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 rabbitmq \
    && useradd --system --uid 999 --gid rabbitmq --home-dir /var/lib/rabbitmq \
        --shell /bin/false rabbitmq \
    && apt-get update \
    && apt-get install -y --no-install-recommends rabbitmq-server \
    && rm -rf /var/lib/apt/lists/* /var/log/rabbitmq/* \
    && mkdir -p /etc/rabbitmq/conf.d \
    && : >/etc/rabbitmq/rabbitmq-env.conf

ENV HOME=/var/lib/rabbitmq \
    PATH=/usr/lib/rabbitmq/bin:$PATH
USER 999:999
WORKDIR /var/lib/rabbitmq
EXPOSE 5671 5672 1883 8883 15672 15692
# Not /usr/sbin/rabbitmq-server: Debian's wrapper sends the console to a file.
CMD ["rabbitmq-server"]
