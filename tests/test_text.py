"""data=text (lca_lab.text via lca_lab.data.text): byte windows and shifted targets, the seeded split,
provenance (corpus, SHA-256), dict inputs, and one-line errors naming the key."""

import hashlib

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from lca_lab import data, nets
from lca_lab.text import DEFAULT_MAX_BYTES, TokenDataset, text

CORPUS = bytes(range(256)) * 3 + b"tail"  # 772 bytes, every byte value


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_bytes(CORPUS)
    return p


def _rows(x):
    return {tuple(r) for r in x.tolist()}


def test_windows_and_targets_are_the_file_cut_in_pieces(corpus):
    d = text(path=corpus, window=9, test_fraction=0.25, split_seed=3)
    n = len(CORPUS) // 10  # pieces of window + 1 bytes; the 2-byte tail is left out
    pieces = torch.tensor(list(CORPUS[: n * 10])).reshape(n, 10)
    perm = np.random.default_rng(3).permutation(n)
    n_test = int(n * 0.25)
    (x, y), (xt, yt) = d["train"].tensors, d["test"].tensors
    assert x.dtype == y.dtype == torch.int64 and x.shape == (n - n_test, 9) and yt.shape == (n_test, 9)
    torch.testing.assert_close(x, pieces[perm[: n - n_test], :-1])  # train order = the permutation
    torch.testing.assert_close(y, pieces[perm[: n - n_test], 1:])
    torch.testing.assert_close(xt, pieces[perm[n - n_test :], :-1])
    torch.testing.assert_close(x[:, 1:], y[:, :-1])  # targets: the inputs shifted by one byte
    assert d["n_classes"] == 256 and int(y.max()) < 256
    assert d["info"] == {
        "corpus": str(corpus.absolute()),
        "sha256": hashlib.sha256(CORPUS[: n * 10]).hexdigest(),
        "n_bytes": n * 10,
        "source_n_bytes": len(CORPUS),
        "window": 9,
        "encoding": "bytes",
    }


def test_split_is_disjoint_complete_and_seeded(corpus):
    a, b, c = (text(path=corpus, window=8, split_seed=s, test_fraction=0.3) for s in (0, 0, 1))
    train, test = _rows(a["train"].tensors[0]), _rows(a["test"].tensors[0])
    n = len(CORPUS) // 9
    # every piece once (all distinct: pieces of 9 bytes start at 9k mod 256, distinct for k < 256)
    assert not train & test and len(train) + len(test) == n == len(a["train"]) + len(a["test"])
    assert torch.equal(a["train"].tensors[0], b["train"].tensors[0])
    assert not torch.equal(a["train"].tensors[0], c["train"].tensors[0])
    assert _rows(c["test"].tensors[0]) != test
    assert len(text(path=corpus, window=8, test_fraction=0.0)["test"]) == 0


def test_default_corpus_is_pydoc_topics_with_its_hash():
    from pydoc_data.topics import topics

    raw = "".join(topics[k] for k in sorted(topics)).encode("utf-8")
    d = data.text()  # exported from lca_lab.data, the conf/data/text.yaml target
    info = d["info"]
    n = DEFAULT_MAX_BYTES // 65
    assert info["corpus"] == "pydoc_data.topics" and info["n_bytes"] == n * 65
    assert info["sha256"] == hashlib.sha256(raw[: n * 65]).hexdigest()
    assert info["source_n_bytes"] == len(raw) > DEFAULT_MAX_BYTES
    x, y = d["train"].tensors
    assert x.shape[1] == 64 and len(d["train"]) + len(d["test"]) == n
    assert bytes(x[0].tolist()) in raw
    whole = text(max_bytes=None, window=1000)["info"]
    assert whole["n_bytes"] == len(raw) // 1001 * 1001


def test_dict_inputs_items_and_whole_tensors(corpus):
    plain = text(path=corpus, window=5)["train"]
    d = text(path=corpus, window=5, dict_inputs=True)["train"]
    assert isinstance(plain, TensorDataset) and isinstance(d, TokenDataset) and len(d) == len(plain)
    inputs, target = d[3]
    assert set(inputs) == {"input_ids"}
    torch.testing.assert_close(inputs["input_ids"], plain[3][0])
    torch.testing.assert_close(target, plain[3][1])
    torch.testing.assert_close(d.inputs["input_ids"], plain.tensors[0])
    torch.testing.assert_close(d.targets, plain.tensors[1])


def test_default_gpt_reads_the_default_text():
    d = text()
    x, y = d["train"].tensors
    torch.manual_seed(0)
    m = nets.gpt(n_classes=d["n_classes"], input_shape=tuple(x.shape[1:]))
    logits = m(x[:2])
    assert logits.shape == (2, 64, 256)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y[:2].reshape(-1))
    assert abs(loss.item() - np.log(256)) < 0.1  # GPT-2 init: close to uniform over the bytes


@pytest.mark.parametrize(
    "make,kwargs,match",
    [
        (None, {"path": "/no/such/file.txt"}, r"data\.path=/no/such/file\.txt does not exist"),
        ("empty", {}, r"data\.path=.* is empty"),
        ("short", {"window": 8}, r"has 5 bytes.*data\.window"),
        ("dir", {}, r"data\.path=.* is not a file"),
        ("ok", {"window": 0}, r"data\.window=0 must"),
        ("ok", {"window": 2.5}, r"data\.window=2\.5 must"),
        ("ok", {"test_fraction": 1.0}, r"data\.test_fraction=1\.0 must"),
        ("ok", {"test_fraction": -0.1}, r"data\.test_fraction=-0\.1 must"),
        ("ok", {"split_seed": -1}, r"data\.split_seed=-1 must"),
        ("ok", {"max_bytes": 4, "window": 8}, r"data\.max_bytes=4 must"),
        ("ok", {"dict_inputs": "yes"}, r"data\.dict_inputs='yes' must"),
    ],
)
def test_bad_input_names_the_key_in_one_line(tmp_path, make, kwargs, match):
    p = tmp_path / "t.txt"
    if make == "empty":
        p.write_bytes(b"")
    elif make == "short":
        p.write_bytes(b"12345")
    elif make == "dir":
        p = tmp_path
    elif make == "ok":
        p.write_bytes(CORPUS)
    path = kwargs.pop("path", p)
    with pytest.raises(ValueError, match=match) as e:
        text(path=path, **kwargs)
    assert "\n" not in str(e.value)


def test_default_corpus_shorter_than_a_window_is_refused():
    with pytest.raises(ValueError, match=r"bundled corpus.*data\.window"):
        text(window=10**7, max_bytes=None)
