"""Data loaders: shapes, dtypes, fixed splits, clear errors, and no network ever."""
from __future__ import annotations

import gzip
import socket

import numpy as np
import pytest

from normlab.lab import data


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the lab must never open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("name,shape,n_train,n_test", [
    ("digits", (1, 8, 8), 1437, 360),
    ("mnist-subset", (1, 28, 28), 4000, 1000),
    ("mnist1d", (1, 40), 4000, 1000),
    ("padded-seq", (40, 8), 4000, 1000),
])
def test_offline_data_sets(no_network, name, shape, n_train, n_test):
    ds = data.load(name)
    assert ds.x_train.shape == (n_train, *shape) and ds.x_test.shape == (n_test, *shape)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert set(np.unique(ds.y_train)) == set(range(ds.num_classes))
    counts = np.bincount(ds.y_train)
    assert counts.min() > 0.8 * counts.max(), "classes are roughly balanced"


def test_generation_bypasses_the_cache(no_network, tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_CACHE_DIR", str(tmp_path))
    data._digits.cache_clear()
    try:
        ds = data.load("digits")
        assert (tmp_path / "digits-v1.npz").is_file()
        np.testing.assert_array_equal(ds.x_train, data._digits.__wrapped__().x_train)
        assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    finally:
        data._digits.cache_clear()


def test_mnist_subset_is_shuffled_not_ordered_by_class():
    ds = data.load("mnist-subset")
    assert len(set(ds.y_train[:50])) >= 8
    x = ds.x_train[:200]  # pixels are bytes / 255: 0 and 255 map to exactly 0 and 1
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_allclose(x * 255, np.round(x * 255), atol=1e-4)


def test_padded_seq_padding_and_mask():
    ds = data.make_padded_seq(n_train=200, n_test=50, min_len=5, max_len=12, num_features=3, num_classes=3)
    assert ds.x_train.shape == (200, 12, 3) and ds.mask_train.shape == (200, 12)
    lengths = data.lengths(ds.mask_train)
    assert lengths.min() >= 5 and lengths.max() <= 12
    assert np.all(ds.x_train[~ds.mask_train] == 0), "padding is zero"
    assert np.all(ds.mask_train[:, 0]) and np.all(np.diff(ds.mask_train.astype(int), axis=1) <= 0), "padded at the end"
    valid = ds.x_train[ds.mask_train]
    assert abs(valid.mean() - 1.0) < 0.2, "real steps have mean `offset`, unlike the padding"
    again = data.make_padded_seq(n_train=200, n_test=50, min_len=5, max_len=12, num_features=3, num_classes=3)
    np.testing.assert_array_equal(ds.x_train, again.x_train)


def test_unknown_data_set():
    with pytest.raises(data.DataError, match="unknown data set 'cifar'.*digits"):
        data.load("cifar")


def test_mnist_without_files_says_which_files_go_where(tmp_path, monkeypatch):
    monkeypatch.delenv("NORMLAB_DATA_DIR", raising=False)
    with pytest.raises(data.DataError, match="--data-dir"):
        data.load("mnist")
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.*t10k-labels-idx1-ubyte"):
        data.check_available("mnist", str(tmp_path))


def _idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for stem, n in (("train", 6), ("t10k", 4)):
        _idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    ds = data.load("mnist", str(tmp_path))
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    assert ds.x_train.max() <= 1.0 and list(ds.y_test) == [0, 1, 2, 3]


def test_mnist_from_npz(tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((3, 28, 28), np.uint8), y_train=np.arange(3),
             x_test=np.full((2, 28, 28), 255, np.uint8), y_test=np.arange(2))
    ds = data.load("mnist", str(tmp_path))
    assert ds.x_test.shape == (2, 1, 28, 28) and ds.x_test.max() == 1.0


def test_runs_on_mnist_from_another_folder_are_not_the_same_cache_entry(tmp_path):
    from normlab.lab import runner

    folders = [tmp_path / "a", tmp_path / "b"]
    for i, d in enumerate(folders):
        d.mkdir()
        np.savez(d / "mnist.npz", x_train=np.full((3, 28, 28), i, np.uint8), y_train=np.arange(3),
                 x_test=np.zeros((2, 28, 28), np.uint8), y_test=np.arange(2))
    sets = ["data=mnist", "batch_size=2", "probe=2"]  # (3 training, 2 test images: the defaults would be refused)
    hashes = [runner.plan(["bn-mnist"], scale="smoke", seeds=1, sets=sets, data_dir=str(d))[0].config_hash
              for d in folders]
    assert hashes[0] != hashes[1]
    again = runner.plan(["bn-mnist"], scale="smoke", seeds=1, sets=sets, data_dir=str(folders[0]))
    assert again[0].config_hash == hashes[0]
    plain = runner.plan(["bn-mnist"], scale="smoke", seeds=1)[0].config_hash  # embedded data: key unchanged
    assert plain == runner.plan(["bn-mnist"], scale="smoke", seeds=1, data_dir=str(folders[0]))[0].config_hash


def test_an_npz_without_the_expected_arrays_is_a_data_error(tmp_path):
    np.savez(tmp_path / "mnist.npz", images=np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(data.DataError, match="cannot read MNIST.*x_train"):
        data.check_available("mnist", str(tmp_path))


def test_a_file_that_is_not_an_npz_archive_is_named_as_such(tmp_path):
    """np.load took it for a pickle and advised allow_pickle=True: wrong advice for a corrupt file."""
    (tmp_path / "mnist.npz").write_bytes(b"not an archive at all")
    with pytest.raises(data.DataError, match=r"mnist.npz is not an .npz archive") as err:
        data.check_available("mnist", str(tmp_path))
    assert "pickle" not in str(err.value)


# -- the split, the cache, the IDX reader and the generated sequences: small direct checks ----------

def test_stratified_split_takes_exactly_n_test_at_random_within_each_class():
    y = np.repeat(np.arange(3), 5)  # shares of 2/3 each: floor 0, then the largest remainders
    train, test = data._stratified_split(y, n_test=2, seed=0)
    assert len(test) == 2 and sorted(np.concatenate([train, test]).tolist()) == list(range(15))
    tests = {frozenset(data._stratified_split(np.repeat(np.arange(2), 50), n_test=10, seed=s)[1].tolist())
             for s in range(3)}
    assert len(tests) == 3  # the seed picks which examples of a class go to the test split, not only their order


def test_the_cache_is_only_an_accelerator(tmp_path, monkeypatch):
    """A cache file that cannot be read (garbage, truncated) is rebuilt; a cache folder that cannot
    be written is skipped."""
    made = {"a": np.arange(3)}
    monkeypatch.setenv("NORMLAB_CACHE_DIR", str(tmp_path))
    for bad in (b"not an npz", b"PK\x03\x04" + b"x" * 64):  # the second: a truncated zip
        (tmp_path / "k.npz").write_bytes(bad)
        np.testing.assert_array_equal(data._cached("k", lambda: made)["a"], made["a"])
        with np.load(tmp_path / "k.npz") as f:  # rewritten
            np.testing.assert_array_equal(f["a"], made["a"])
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("NORMLAB_CACHE_DIR", str(tmp_path / "file" / "sub"))  # cannot be created
    assert data._cached("k", lambda: made) is made


def test_mnist1d_generation_leaves_the_global_numpy_rng_as_it_was(monkeypatch):
    import mnist1d.data

    def fake_make_dataset(args):  # make_dataset seeds the global RNGs
        np.random.seed(args.seed)
        z = np.zeros((2, 40))
        return {"x": z, "y": np.zeros(2), "x_test": z, "y_test": np.zeros(2)}

    monkeypatch.setattr(mnist1d.data, "make_dataset", fake_make_dataset)
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    out = data._make_mnist1d()
    assert np.random.random() == expected and out["x_train"].shape == (2, 1, 40)


def test_idx_files_that_are_not_unsigned_bytes_or_hold_more_than_their_header_are_refused(tmp_path):
    header = bytes([0, 0, 0x0D, 1]) + (4).to_bytes(4, "big")  # 0x0D: float32
    (tmp_path / "f.idx").write_bytes(header + np.zeros(4, ">f4").tobytes())
    with pytest.raises(data.DataError, match="not an IDX file of unsigned bytes"):
        data._read_idx(tmp_path / "f.idx")
    (tmp_path / "g.idx").write_bytes(bytes([0, 0, 0x08, 1]) + (3).to_bytes(4, "big") + bytes(5))
    with pytest.raises(data.DataError, match=r"header says \[3\], file holds 5 values"):
        data._read_idx(tmp_path / "g.idx")


def test_mnist_files_with_dotted_names_from_the_environments_folder(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for stem, n in (("train", 3), ("t10k", 2)):  # train-images.idx3-ubyte, as some mirrors name them
        _idx(tmp_path / f"{stem}-images.idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(tmp_path / f"{stem}-labels.idx1-ubyte.gz", np.arange(n))
    monkeypatch.setenv("NORMLAB_DATA_DIR", str(tmp_path))
    ds = data.load("mnist")
    assert ds.x_train.shape == (3, 1, 28, 28) and list(ds.y_test) == [0, 1]


def test_missing_mnist_files_are_said_once_not_wrapped(tmp_path):
    with pytest.raises(data.DataError) as err:
        data.check_available("mnist", str(tmp_path))
    assert str(err.value).startswith("MNIST files missing in") and "cannot read" not in str(err.value)


def test_the_source_key_changes_with_a_files_modification_time(tmp_path):
    import os

    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((1, 28, 28), np.uint8))
    before = data.source_key("mnist", str(tmp_path))
    os.utime(tmp_path / "mnist.npz", ns=(1, 10**18))
    assert data.source_key("mnist", str(tmp_path)) != before


def test_padded_seq_balanced_classes_fixed_length_and_test_masks_that_fit_their_inputs():
    ds = data.make_padded_seq(n_train=20, n_test=10, min_len=3, max_len=9, num_features=2, num_classes=3)
    y = np.concatenate([ds.y_train, ds.y_test])
    assert np.bincount(y).tolist() == [10, 10, 10]
    assert ds.mask_test.shape == (10, 9)
    assert np.all((ds.x_test != 0).any(axis=-1) == ds.mask_test)  # padding (all 0) exactly where masked
    fixed = data.make_padded_seq(n_train=4, n_test=2, min_len=5, max_len=5, num_features=2, num_classes=2)
    assert fixed.mask_train.all() and fixed.mask_test.all()
