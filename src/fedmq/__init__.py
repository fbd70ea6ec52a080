"""fedmq: asynchronous federated learning for edge fleets over RabbitMQ and MQTT."""

__version__ = "0.1.0"
__all__ = ["__version__"]
