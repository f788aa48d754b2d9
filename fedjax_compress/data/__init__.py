"""Federated datasets: built-in offline synthetic data, partitions, optional tfds loaders.

Public API:
  - `FederatedData(clients, test, num_classes, name)`; `from_partition(arrays, parts, test,
    num_classes, name='')`.
  - `synthetic(alpha, beta, num_clients=30, *, dim=60, num_classes=10, samples_per_client=100,
    size_sigma=0.5, test_fraction=0.2, iid=False, seed=0) -> FederatedData`.
  - `synthetic_images(num_train, num_test=1000, *, image_size=28, num_classes=10,
    prototypes=3, strokes=3, max_shift=2, noise=0.3, seed=0) -> (train, test)` arrays of
    MNIST-shaped stroke images (centralized; split them with a partition).
  - `synthetic_tokens(num_clients=8, *, vocab_size=50257, seq_len=128, ...) -> FederatedData`
    (offline next-token data for language models).
  - `partition_iid(num_examples, num_clients, seed=0)`,
    `partition_dirichlet(labels, num_clients, alpha, seed=0)`,
    `partition_classes(labels, num_clients, classes_per_client, seed=0)` -> list of index arrays.
  - `load_digits(num_clients=20, *, partition='dirichlet', alpha=0.5, classes_per_client=2,
    test_fraction=0.2, seed=0)`: scikit-learn's 8x8 digits (real, offline; the `data` extra).
  - `load_tfds(name, *, data_dir=None, num_clients=100, partition='dirichlet', alpha=0.5,
    seq_len=80, download=False, seed=0) -> FederatedData` (needs the `data` extra).
  - `load_sqlite(train_path, test_path=None, *, dataset, max_clients=None, lazy=False, ...)`:
    FedJAX / TFF SQLite client data (EMNIST, Shakespeare, StackOverflow, CIFAR-100) with
    FedJAX's preprocessing (`emnist_preprocess`, `shakespeare_preprocess`,
    `stackoverflow_tokenizer(vocab)`, `cifar100_preprocess`); `SQLiteClients(path)` streams
    `(client_id, examples)` one client at a time.
  - `load_leaf(dataset, train, test=None, *, max_clients=None, ...)`: LEAF JSON (FEMNIST,
    Shakespeare, Sent140); `leaf_clients(dataset, paths)` gives per-user arrays.
"""

from fedjax_compress.data._dataset import FederatedData, from_partition
from fedjax_compress.data._digits import load_digits, stratified_split
from fedjax_compress.data._partition import (partition_classes, partition_dirichlet,
                                             partition_iid)
from fedjax_compress.data._synthetic import synthetic, synthetic_images
from fedjax_compress.data._tokens import synthetic_tokens
from fedjax_compress.data._leaf import (LEAF_LETTERS, iter_leaf_users, leaf_char_ids, leaf_clients,
                                        leaf_words, load_leaf, sent140_vocab)
from fedjax_compress.data._sqlite import (SQLiteClientList, SQLiteClients, cifar100_preprocess,
                                          count_vocab, emnist_preprocess, load_sqlite,
                                          shakespeare_preprocess, stackoverflow_tokenizer,
                                          word_count_vocab)
from fedjax_compress.data._tfds import char_sequences, load_tfds, split_by_role

__all__ = ["FederatedData", "from_partition", "synthetic", "synthetic_images",
           "synthetic_tokens", "partition_iid", "partition_dirichlet", "load_tfds", "split_by_role",
           "char_sequences", "SQLiteClients", "SQLiteClientList", "load_sqlite",
           "emnist_preprocess", "shakespeare_preprocess", "stackoverflow_tokenizer",
           "cifar100_preprocess", "word_count_vocab", "count_vocab", "load_leaf", "leaf_clients",
           "iter_leaf_users", "leaf_char_ids", "leaf_words", "sent140_vocab", "LEAF_LETTERS",
           "load_digits", "stratified_split", "partition_classes"]
