"""The seed document's Python API: FedClient and FedServer."""

from fedlearn.core.client import FedClient
from fedlearn.core.server import FedServer

__all__ = ["FedClient", "FedServer"]
