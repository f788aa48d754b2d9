"""Quickstart: FedAvg on Synthetic(0.5, 0.5) with QSGD uplink; about a minute on a laptop CPU.

python -m experiments.run --config=experiments/configs/quickstart.py --workdir=results/quickstart
Override any field, e.g. `--config.compressor=top_k --config.compressor_kwargs='{"fraction": 0.1}'`
(or edit a copy of this file).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Config of the quickstart run (all fields are read by `experiments.common.run_experiment`)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dataset = ml_collections.ConfigDict(dict(
      name="synthetic", alpha=0.5, beta=0.5, num_clients=30, dim=60, num_classes=10,
      samples_per_client=100, seed=0))
  c.model = ml_collections.ConfigDict(dict(name="logistic", kwargs={}))
  # uplink compressor: any factory of fedjax_compress.compressors, by name, with kwargs;
  # nested compressors (e.g. lbgm's `inner`) are given as {"name": ..., "kwargs": {...}}.
  c.compressor = "qsgd"
  c.compressor_kwargs = {"levels": 4, "bucket_size": 64}
  c.error_feedback = False
  c.downlink = ""  # "" = uncompressed broadcast (billed at the dense model size)
  c.downlink_kwargs = {}
  c.rounds = 60
  c.cohort_size = 10
  c.local_steps = 5
  c.batch_size = 10
  c.client_lr = 0.05
  c.server_opt = "sgd"  # FedAvg; "adam" / "momentum" give FedOpt variants
  c.server_lr = 1.0
  c.weighting = "num_examples"
  c.eval_every = 1
  c.checkpoint_every = 10
  c.shard = True  # split the cohort over all local devices (padding to a multiple)
  # clients vmapped together inside the round program: None = backend default (1 on CPU,
  # the whole cohort elsewhere), "all", or an integer (smaller = less memory)
  c.clients_per_chunk = ml_collections.config_dict.placeholder(object)
  return c
