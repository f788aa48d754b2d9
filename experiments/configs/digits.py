"""FedAvg on scikit-learn's 8x8 digits (offline, the `data` extra) with a QSGD uplink.

python -m experiments.run --config=experiments/configs/digits.py --workdir=results/digits

1,797 images: a stratified 20% is the test set, the rest is split over 20 clients by a
Dirichlet(0.5) label skew (`data.load_digits`); an MLP 64-64-10 (4,810 parameters), 50
rounds of 10 clients x 5 local steps. The same task as `benchmarks/compare.py --dataset
digits`. Override any field as in the quickstart, e.g. `--config.dataset.partition=classes`.
"""

import ml_collections

from experiments.configs import quickstart


def get_config() -> ml_collections.ConfigDict:
  """The quickstart's training settings on the digits task."""
  c = quickstart.get_config()
  c.dataset = ml_collections.ConfigDict(dict(
      name="digits", num_clients=20, partition="dirichlet", alpha=0.5, seed=0))
  c.model = ml_collections.ConfigDict(dict(name="mlp", kwargs={"hidden": (64,)}))
  c.rounds = 50
  return c
