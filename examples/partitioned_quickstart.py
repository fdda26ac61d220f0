"""The seed's API used the proper way: each client holds its own non-IID share of the data.

Ten clients get a Dirichlet(alpha=0.5) label-skewed share of the training split and keep a
fifth of it as their local test set; half of them train in each round. Runs offline on the
built-in 8x8 digits in about ten seconds; `--dataset mnist --data-dir DIR` uses MNIST files.

    python examples/partitioned_quickstart.py [--dataset mnist --data-dir ../shared/datasets/mnist]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import Subset

from fedlearn.core.client import FedClient
from fedlearn.core.server import FedServer
from fedlearn.data import load_dataset, partition_indices, split_train_test
from fedlearn.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    torch.set_num_threads(1)  # small models on few cores: one thread is faster (benchmarks/README.md)
    torch.manual_seed(0)
    data = load_dataset(args.dataset, args.data_dir)
    shares = partition_indices(data.train.y.numpy(), args.clients, "dirichlet", alpha=0.5, seed=0)
    clients = []
    for i, share in enumerate(shares):
        train_idx, test_idx = split_train_test(share, test_fraction=0.2, seed=i)
        clients.append(
            FedClient(
                model=build_model("seed-cnn", data.input_shape, data.num_classes),
                train_dataset=Subset(data.train, torch.as_tensor(train_idx)),
                test_dataset=Subset(data.train, torch.as_tensor(test_idx)),
                client_id=f"site-{i}",
                batch_size=10,
            )
        )
    server = FedServer(clients, fraction=0.5, seed=0, test_dataset=data.test)
    for rnd in range(args.rounds):
        row = server.train(num_epochs=2, lr=0.1)
        print(
            f"round {rnd + 1:2d}: clients {row['clients_succeeded']}/{row['clients_sampled']}, "
            f"held-out accuracy {row['test_accuracy']:.3f}, clients' test accuracy {server.evaluate():.3f}"
        )


if __name__ == "__main__":
    main()
