"""fedlearn: federated learning with real server and client processes."""

__version__ = "0.1.0"
