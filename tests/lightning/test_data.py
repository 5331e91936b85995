"""truegrad_lightning.data: the built-in, download-free LightningDataModules."""

from __future__ import annotations

import codecs
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("lightning.pytorch")
pytest.importorskip("sklearn")

from lightning.pytorch import LightningDataModule  # noqa: E402

from truegrad_lightning.data import CharDataModule, DigitsDataModule  # noqa: E402
from truegrad_lightning.data.chars import CharWindows, load_corpus  # noqa: E402

pytestmark = pytest.mark.lightning

# class counts of sklearn's load_digits, digits 0..9
DIGIT_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def docs() -> CharDataModule:
    return CharDataModule()


@pytest.fixture(scope="module")
def zen() -> CharDataModule:
    return CharDataModule(corpus="zen", block_size=16)


def _first_batch(loader):
    return next(iter(loader))


# ----------------------------------------------------------------------------- digits


def test_digits_default_sizes_shapes_dtypes(digits: DigitsDataModule) -> None:
    assert isinstance(digits, LightningDataModule)
    assert digits.num_classes == 10
    assert digits.input_shape == (1, 8, 8)
    assert (len(digits.train_dataset), len(digits.val_dataset), len(digits.test_dataset)) == (
        1079,
        359,
        359,
    )
    x, y = digits.train_dataset.tensors
    assert x.dtype == torch.float32 and x.shape == (1079, 1, 8, 8)
    assert y.dtype == torch.int64 and y.shape == (1079,)
    xb, yb = _first_batch(digits.train_dataloader())
    assert xb.shape == (64, 1, 8, 8) and xb.dtype == torch.float32
    assert yb.shape == (64,) and yb.dtype == torch.int64
    # drop_last=False: 1079 = 16 * 64 + 55
    assert len(digits.train_dataloader()) == 17
    assert len(digits.val_dataloader()) == 6 and len(digits.test_dataloader()) == 6
    assert digits.hparams["batch_size"] == 64 and digits.hparams["val_fraction"] == 0.2
    assert digits.hparams["test_fraction"] == 0.2


def test_digits_splits_partition_and_are_stratified(digits: DigitsDataModule) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float64) / 16.0
    counts = {
        name: np.bincount(ds.tensors[1].numpy(), minlength=10)
        for name, ds in (
            ("train", digits.train_dataset),
            ("val", digits.val_dataset),
            ("test", digits.test_dataset),
        )
    }
    assert (counts["train"] + counts["val"] + counts["test"]).tolist() == DIGIT_COUNTS
    # per class floor(0.2 * count) topped up by largest remainder to 359 in total
    assert counts["val"].tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    assert counts["test"].tolist() == counts["val"].tolist()
    # the union of train, val and test is exactly the data set, each image once
    splits = (digits.train_dataset, digits.val_dataset, digits.test_dataset)
    restored = torch.cat([ds.tensors[0] for ds in splits])
    restored = restored.double() * digits.std + digits.mean

    def rows(t: torch.Tensor) -> list[tuple[int, ...]]:
        return sorted(map(tuple, torch.round(t.reshape(len(t), -1) * 16).long().tolist()))

    assert rows(restored) == rows(images)


def test_digits_standardised_with_train_statistics(digits: DigitsDataModule) -> None:
    from sklearn.datasets import load_digits

    x_train = digits.train_dataset.tensors[0].double()
    assert abs(x_train.mean().item()) < 1e-6
    assert abs(x_train.std(correction=0).item() - 1.0) < 1e-6
    # mean/std are those of the training images only (pixel / 16), not of all images
    all_images = torch.as_tensor(load_digits().images, dtype=torch.float64) / 16.0
    raw_train = x_train * digits.std + digits.mean
    assert digits.mean == pytest.approx(raw_train.mean().item(), abs=1e-6)
    assert digits.mean != pytest.approx(all_images.mean().item(), abs=1e-6)
    assert 0.29 < digits.mean < 0.32 and 0.36 < digits.std < 0.39
    # val uses the same affine map, so it is not exactly standardised
    x_val = digits.val_dataset.tensors[0].double()
    assert abs(x_val.mean().item()) > 1e-4
    assert torch.allclose(raw_train.min(), torch.tensor(0.0, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(raw_train.max(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6)


def test_digits_deterministic_for_fixed_seed(digits: DigitsDataModule) -> None:
    global_state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    again = DigitsDataModule(seed=0)
    pairs = ((digits.train_dataset, again.train_dataset), (digits.val_dataset, again.val_dataset))
    for a, b in pairs:
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    xa, ya = _first_batch(digits.train_dataloader())
    xb, yb = _first_batch(again.train_dataloader())
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # the first batch is shuffled: not the first 64 training rows in order
    assert not torch.equal(ya, digits.train_dataset.tensors[1][:64])
    # the global RNGs are neither used nor advanced
    assert torch.equal(torch.get_rng_state(), global_state)
    assert (np.random.get_state()[1] == np_state).all()

    other = DigitsDataModule(seed=1)
    assert (len(other.train_dataset), len(other.val_dataset)) == (1079, 359)
    assert not torch.equal(other.val_dataset.tensors[0], digits.val_dataset.tensors[0])
    assert not torch.equal(_first_batch(other.train_dataloader())[1], ya)


def test_digits_flatten_and_test_split() -> None:
    dm = DigitsDataModule(batch_size=32, val_fraction=0.1, test_fraction=0.2, flatten=True, seed=3)
    assert dm.input_shape == (64,)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (1258, 180, 359)
    assert dm.train_dataset.tensors[0].shape == (1258, 64)
    xb, yb = _first_batch(dm.test_dataloader())
    assert xb.shape == (32, 64) and yb.dtype == torch.int64
    # test and predict use the test split, in order
    assert torch.equal(yb, dm.test_dataset.tensors[1][:32])
    assert torch.equal(_first_batch(dm.predict_dataloader())[1], yb)
    assert (np.bincount(dm.test_dataset.tensors[1].numpy(), minlength=10) > 0).all()
    # flatten is a reshape of the unflattened data
    square = DigitsDataModule(batch_size=32, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert torch.equal(square.test_dataset.tensors[0].reshape(359, 64), dm.test_dataset.tensors[0])


def test_digits_test_and_predict_use_the_test_split(digits: DigitsDataModule) -> None:
    val_y = torch.cat([y for _, y in digits.val_dataloader()])
    test_y = torch.cat([y for _, y in digits.test_dataloader()])
    predict_y = torch.cat([y for _, y in digits.predict_dataloader()])
    assert len(val_y) == len(test_y) == 359
    assert torch.equal(val_y, digits.val_dataset.tensors[1])  # not shuffled
    assert torch.equal(test_y, digits.test_dataset.tensors[1]) and torch.equal(predict_y, test_y)


def test_digits_without_test_split_refuses_test_and_predicts_val() -> None:
    dm = DigitsDataModule(test_fraction=0.0)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (1438, 359, 0)
    with pytest.raises(ValueError, match=r"test_fraction=0\) has no test split"):
        dm.test_dataloader()
    predict_y = torch.cat([y for _, y in dm.predict_dataloader()])
    assert torch.equal(predict_y, dm.val_dataset.tensors[1])


def test_digits_missing_sklearn_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    dm = DigitsDataModule()  # sklearn is imported lazily, not in __init__
    with pytest.raises(ModuleNotFoundError, match=r"truegrad\[lightning\]"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"test_fraction": -0.5}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, r"val_fraction \+ test_fraction"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_digits_argument_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


# ----------------------------------------------------------------------------- chars


def test_char_default_sizes(docs: CharDataModule) -> None:
    assert isinstance(docs, LightningDataModule)
    assert len(docs.text) == 200_000
    assert (len(docs.train_ids), len(docs.val_ids)) == (180_000, 20_000)
    assert docs.train_stride == 64
    assert (len(docs.train_dataset), len(docs.val_dataset)) == (2811, 156)
    assert docs.vocab_size == len(set(docs.text))
    if sys.version_info[:3] == (3, 11, 7):
        assert docs.vocab_size == 100
    assert docs.text == load_corpus("python_docs")[:200_000]
    x, y = _first_batch(docs.train_dataloader())
    assert x.shape == y.shape == (32, 128)
    assert x.dtype == y.dtype == torch.int64
    assert len(docs.train_dataloader()) == 88  # ceil(2811 / 32)


def test_char_zen_sizes_and_text(zen: CharDataModule) -> None:
    assert zen.text.startswith("The Zen of Python, by Tim Peters\n\nBeautiful is better than ugly.")
    assert len(zen.text) == 856
    assert zen.vocab_size == 45
    assert (len(zen.train_ids), len(zen.val_ids)) == (770, 86)
    assert zen.train_stride == 8
    assert (len(zen.train_dataset), len(zen.val_dataset)) == (95, 5)
    full = CharDataModule(max_chars=None)
    assert len(full.text) == len(load_corpus("python_docs")) > 200_000


def test_char_vocab_and_round_trip(docs: CharDataModule, zen: CharDataModule) -> None:
    assert docs.itos == sorted(set(docs.text))
    assert set(docs.text) <= set(docs.itos)
    ids = docs.encode(docs.text)
    assert ids.dtype == torch.int64 and ids.shape == (200_000,)
    assert torch.equal(ids, docs.ids)
    assert int(ids.min()) == 0 and int(ids.max()) == docs.vocab_size - 1
    assert docs.decode(ids) == docs.text
    assert docs.decode(ids.tolist()[:50]) == docs.text[:50]
    assert zen.encode("Zen").tolist() == [zen.stoi["Z"], zen.stoi["e"], zen.stoi["n"]]
    assert zen.itos[zen.stoi["e"]] == "e"
    assert zen.decode(zen.encode(zen.text)) == zen.text
    with pytest.raises(ValueError, match="'~'"):
        zen.encode("ab~")


def test_char_windows_shift_by_one(zen: CharDataModule) -> None:
    ds = zen.train_dataset
    for k in (0, 1, 50, len(ds) - 1):
        x, y = ds[k]
        i = k * 8
        assert x.shape == y.shape == (16,)
        assert torch.equal(x, zen.train_ids[i : i + 16])
        assert torch.equal(y, zen.train_ids[i + 1 : i + 17])
        assert torch.equal(x[1:], y[:-1])
        assert zen.decode(y) == zen.text[i + 1 : i + 17]
    with pytest.raises(IndexError):
        ds[len(ds)]
    # the last training window's target stays inside the training text
    last_end = (len(ds) - 1) * 8 + 17
    assert last_end <= len(zen.train_ids)
    # validation windows are non-overlapping and taken from the end of the text
    val_x = torch.stack([zen.val_dataset[k][0] for k in range(5)])
    assert torch.equal(val_x.reshape(-1), zen.val_ids[:80])
    assert zen.decode(zen.val_ids) == zen.text[770:]


def test_char_contiguous_split_no_overlap(docs: CharDataModule) -> None:
    assert torch.equal(torch.cat([docs.train_ids, docs.val_ids]), docs.ids)
    train_text, val_text = docs.decode(docs.train_ids), docs.decode(docs.val_ids)
    assert train_text + val_text == docs.text
    # every training window (inputs and targets) lies in the first 180,000 characters
    assert (len(docs.train_dataset) - 1) * docs.train_stride + docs.block_size + 1 <= 180_000
    # every validation batch, in order, reads the validation text
    val_x = torch.cat([x for x, _ in docs.val_dataloader()])
    assert val_x.shape == (156, 128)
    assert torch.equal(val_x.reshape(-1), docs.val_ids[: 156 * 128])
    test_x = torch.cat([x for x, _ in docs.test_dataloader()])
    assert torch.equal(test_x, val_x)


def test_char_determinism(zen: CharDataModule) -> None:
    state = torch.get_rng_state()
    again = CharDataModule(corpus="zen", block_size=16)
    xa, ya = _first_batch(zen.train_dataloader())
    xb, yb = _first_batch(again.train_dataloader())
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(torch.get_rng_state(), state)
    # shuffled: not the first windows in text order
    in_order = torch.stack([zen.train_dataset[k][0] for k in range(32)])
    assert not torch.equal(xa, in_order)
    other = CharDataModule(corpus="zen", block_size=16, seed=1)
    assert torch.equal(other.train_ids, zen.train_ids)  # the split does not depend on seed
    assert not torch.equal(_first_batch(other.train_dataloader())[0], xa)


def test_char_windows_direct() -> None:
    ids = torch.arange(10)
    ds = CharWindows(ids, block_size=4, stride=3)
    assert len(ds) == 2  # starts 0 and 3; start 6 would need ids[6:11]
    assert ds[1][0].tolist() == [3, 4, 5, 6] and ds[1][1].tolist() == [4, 5, 6, 7]
    assert ds[-1][1].tolist() == [4, 5, 6, 7]
    assert len(CharWindows(ids, block_size=10, stride=1)) == 0


def test_char_zen_corpus_prints_nothing(monkeypatch, capsys) -> None:
    monkeypatch.delitem(sys.modules, "this", raising=False)  # force a fresh `import this`
    capsys.readouterr()
    text = load_corpus("zen")
    assert capsys.readouterr().out == ""
    import this

    assert text == codecs.decode(this.s, "rot13")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"corpus": "shakespeare"}, "corpus"),
        ({"block_size": 0}, "block_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"max_chars": 0}, "max_chars"),
        ({"num_workers": -1}, "num_workers"),
        ({"train_stride": 0}, "train_stride"),
        ({"block_size": 128}, "block_size=128 is too large"),  # zen's val text: 86 chars
        ({"block_size": 86}, "block_size=86 is too large"),
    ],
)
def test_char_argument_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CharDataModule(**{"corpus": "zen", "block_size": 16, **kwargs})
    CharDataModule(corpus="zen", block_size=85)  # the largest block that fits


def test_signatures_work_with_jsonargparse() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(CharDataModule, "data")
    cfg = parser.parse_args(["--data.corpus=zen", "--data.max_chars=null", "--data.block_size=16"])
    assert cfg.data.corpus == "zen" and cfg.data.max_chars is None and cfg.data.block_size == 16
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_args(["--data.corpus=shakespeare"])
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DigitsDataModule, "data")
    cfg = parser.parse_args(["--data.flatten=true", "--data.val_fraction=0.25"])
    assert cfg.data.flatten is True and cfg.data.val_fraction == 0.25 and cfg.data.batch_size == 64
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_args(["--data.batch_size=1.5"])
