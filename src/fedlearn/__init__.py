"""FedLearn: federated learning of vision models with privacy protection, on PyTorch."""

__version__ = "0.1.0"
