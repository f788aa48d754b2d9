"""LEAF JSON readers (FEMNIST, Shakespeare, Sent140) on small files in LEAF's exact schema."""

import json
import re

import numpy as np
import pytest

from fedjax_compress import data

# LEAF's models/utils/language_utils.py ALL_LETTERS (80 characters)
_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"


def _write(path, users, user_data, **extra):
  blob = {"users": users, "num_samples": [len(user_data[u]["y"]) for u in users],
          "user_data": user_data, **extra}
  path.write_text(json.dumps(blob))
  return str(path)


def test_femnist_directory_order_values_and_invert(tmp_path):
  rng = np.random.default_rng(0)
  d = tmp_path / "train"
  d.mkdir()
  px = {u: rng.random((n, 784)).round(4) for u, n in (("f3", 2), ("f1", 3), ("f9", 0),
                                                         ("f2", 1))}
  lab = {u: rng.integers(0, 62, len(v)).tolist() for u, v in px.items()}
  ud = {u: {"x": px[u].tolist(), "y": lab[u]} for u in px}
  # two files, read in sorted file order; users in file order within a file
  _write(d / "b_1.json", ["f2"], {"f2": ud["f2"]})
  _write(d / "a_0.json", ["f3", "f1", "f9"], {u: ud[u] for u in ("f3", "f1", "f9")},
         hierarchies=[])
  (d / "notes.txt").write_text("not json")
  t = tmp_path / "test.json"
  _write(t, ["f1", "f3"], {"f1": ud["f2"], "f3": ud["f1"]})
  fd = data.load_leaf("femnist", str(d), str(t))
  assert fd.num_classes == 62 and fd.name == "leaf:femnist"
  assert fd.num_clients == 3  # the empty user f9 is dropped
  for c, u in zip(fd.clients, ("f3", "f1", "f2")):
    assert c["x"].dtype == np.float32 and c["x"].shape == (len(lab[u]), 28, 28, 1)
    np.testing.assert_allclose(c["x"].reshape(-1, 784), px[u], rtol=1e-6)
    np.testing.assert_array_equal(c["y"], lab[u])
  assert fd.test["x"].shape == (4, 28, 28, 1)
  inv = data.load_leaf("femnist", str(d), invert=True, max_clients=1)
  assert inv.num_clients == 1 and len(inv.test["y"]) == 0
  np.testing.assert_allclose(inv.clients[0]["x"].reshape(-1, 784), 1.0 - px["f3"], atol=1e-6)
  users, clients = data.leaf_clients("femnist", str(t))
  assert users == ["f1", "f3"] and len(clients[1]["y"]) == 3


def test_shakespeare_char_labels_and_targets(tmp_path):
  rng = np.random.default_rng(1)
  chars = list(_LETTERS) + ["~", "é"]  # two characters outside LEAF's alphabet
  rows = ["".join(rng.choice(chars, 80)) for _ in range(3)]
  nxt = ["a", "~", "}"]
  path = _write(tmp_path / "all_data_niid_0_keep_0_train_9.json", ["THE_TEMPEST_PROSPERO"],
                {"THE_TEMPEST_PROSPERO": {"x": rows, "y": nxt}},
                hierarchies=["THE_TEMPEST"])
  ref = np.array([[_LETTERS.index(c) if c in _LETTERS else 80 for c in r] for r in rows])
  ref_y = np.array([_LETTERS.index(c) if c in _LETTERS else 80 for c in nxt])
  seq = data.load_leaf("shakespeare", path)
  assert seq.num_classes == 81
  c = seq.clients[0]
  assert c["x"].dtype == np.int32 and c["x"].shape == (3, 80)
  np.testing.assert_array_equal(c["x"], ref)
  np.testing.assert_array_equal(c["y"][:, :-1], ref[:, 1:])
  np.testing.assert_array_equal(c["y"][:, -1], ref_y)
  last = data.load_leaf("shakespeare", path, targets="last").clients[0]
  np.testing.assert_array_equal(last["y"], ref_y)
  bad = _write(tmp_path / "bad.json", ["R"], {"R": {"x": ["abc", "ab"], "y": ["d", "e"]}})
  with pytest.raises(ValueError, match="share a length"):
    data.load_leaf("shakespeare", bad)


def _leaf_split(line):  # LEAF's split_line
  return re.findall(r"[\w']+|[.,!?;]", line)


def test_sent140_words_vocab_and_padding(tmp_path):
  tweets = {"u1": ["@bob can't wait!! see u @ 5pm", "wait for it"],
            "u2": ["it is 5pm; wait"]}
  def row(i, text):
    return [str(1000 + i), "Mon Apr 06 22:19:45 PDT 2009", "NO_QUERY", "user", text]
  ud = {u: {"x": [row(i, t) for i, t in enumerate(ts)], "y": [1] * len(ts)}
        for u, ts in tweets.items()}
  path = _write(tmp_path / "train.json", ["u1", "u2"], ud)
  counts = {}
  for ts in tweets.values():
    for t in ts:
      for w in _leaf_split(t):
        counts[w] = counts.get(w, 0) + 1
  want_vocab = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:4]
  assert data.sent140_vocab(path, 4) == want_vocab
  fd = data.load_leaf("sent140", path, vocab_size=4, max_words=6)
  table = {w: i for i, w in enumerate(want_vocab)}
  for c, ts in zip(fd.clients, tweets.values()):
    ref = np.full((len(ts), 6), 4)
    for i, t in enumerate(ts):
      ids = [table.get(w, 4) for w in _leaf_split(t)][:6]
      ref[i, :len(ids)] = ids
    np.testing.assert_array_equal(c["x"], ref)
  assert fd.num_classes == 2 and fd.clients[0]["y"].tolist() == [1, 1]
  given = data.load_leaf("sent140", path, vocab=["wait", "5pm"], max_words=3)
  assert given.clients[1]["x"].tolist() == [[2, 2, 1]]  # it, is -> unk 2; 5pm -> 1


def test_leaf_validation(tmp_path):
  path = _write(tmp_path / "x.json", ["a"], {"a": {"x": [[0.0] * 784], "y": [3]}})
  with pytest.raises(ValueError, match="dataset"):
    data.load_leaf("celeba", path)
  with pytest.raises(ValueError, match="targets"):
    data.load_leaf("shakespeare", path, targets="all")
  with pytest.raises(ValueError, match="max_clients"):
    data.load_leaf("femnist", path, max_clients=0)
  with pytest.raises(FileNotFoundError):
    data.load_leaf("femnist", str(tmp_path / "absent.json"))
  empty_dir = tmp_path / "empty"
  empty_dir.mkdir()
  with pytest.raises(FileNotFoundError, match="no .json"):
    data.load_leaf("femnist", str(empty_dir))
  wrong = tmp_path / "wrong.json"
  wrong.write_text(json.dumps({"users": ["a"]}))
  with pytest.raises(ValueError, match="not a LEAF JSON"):
    data.load_leaf("femnist", str(wrong))
  lying = tmp_path / "lying.json"
  lying.write_text(json.dumps({"users": ["a"], "num_samples": [2],
                               "user_data": {"a": {"x": [[0.0] * 784], "y": [1]}}}))
  with pytest.raises(ValueError, match="num_samples"):
    data.load_leaf("femnist", str(lying))
  short = _write(tmp_path / "short.json", ["a"], {"a": {"x": [[0.0] * 10], "y": [1]}})
  with pytest.raises(ValueError, match="784"):
    data.load_leaf("femnist", short)
  none = _write(tmp_path / "none.json", ["a"], {"a": {"x": [], "y": []}})
  with pytest.raises(ValueError, match="no non-empty user"):
    data.load_leaf("femnist", none)
