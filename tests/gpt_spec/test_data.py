"""Chapter 5's data: the bundled text, the book's split and windows, and loaders whose batch order the
Flax twin replays from the torch twin's DataLoader."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import gpt_flax
import gpt_torch
from gpt_spec import get_tokenizer
from gpt_spec.data import BatchLoader, GPTDatasetV1, split_text, the_verdict, token_windows


def test_the_verdict_is_the_books_text():
    text = the_verdict()
    # The book (§5.1.3): "Characters: 20479", "Tokens: 5145".
    assert len(text) == 20479
    assert len(get_tokenizer().encode(text)) == 5145
    train, val = split_text(text)
    assert (len(train), len(val)) == (18431, 2048) and train + val == text


def test_windows_are_the_books_loop():
    ids = list(range(100, 111))  # 11 tokens
    inputs, targets = token_windows(ids, max_length=4, stride=3)
    # range(0, 11 - 4, 3) -> starts 0, 3, 6
    np.testing.assert_array_equal(inputs, [[100, 101, 102, 103], [103, 104, 105, 106], [106, 107, 108, 109]])
    np.testing.assert_array_equal(targets, inputs + 1)
    assert inputs.dtype == np.int64


@pytest.mark.parametrize(
    "ids, max_length, stride, match",
    [
        ([1, 2, 3], 3, 1, "3 tokens: windows of max_length 3 need at least 4"),
        ([1, 2, 3], 0, 1, "max_length must be an integer >= 1"),
        ([1, 2, 3], 2, 0, "stride must be an integer >= 1"),
        ([1, 2, 3], 2, True, "stride must be an integer >= 1"),
    ],
)
def test_windows_refuse_what_the_book_would_assert_on(ids, max_length, stride, match):
    with pytest.raises(ValueError, match=match):
        token_windows(ids, max_length, stride)


def test_the_chapters_loaders_have_the_books_batch_counts():
    train, val = split_text(the_verdict())
    # The book (§5.1.3) prints 9 training batches and 1 validation batch of (2, 256).
    torch_train = gpt_torch.create_dataloader_v1(train, 2, 256, 256, shuffle=True, drop_last=True)
    torch_val = gpt_torch.create_dataloader_v1(val, 2, 256, 256, shuffle=False, drop_last=False)
    flax_val = gpt_flax.create_dataloader_v1(val, 2, 256, 256, shuffle=False, drop_last=False)
    assert (len(torch_train), len(torch_val), len(flax_val)) == (9, 1, 1)
    assert [tuple(x.shape) for x, _ in torch_val] == [(2, 256)]
    assert [x.shape for x, _ in flax_val] == [(2, 256)]


def _passes(loader, n):
    return [[(np.asarray(x), np.asarray(y)) for x, y in loader] for _ in range(n)]


def test_the_torch_loader_draws_as_dataloader_shuffle_true_and_the_flax_loader_replays_it():
    text = the_verdict()[:3000]
    torch.manual_seed(123)
    book = DataLoader(gpt_torch.GPTDatasetV1(text, get_tokenizer(), 16, 16), batch_size=3, shuffle=True)
    expected = _passes(book, 3)
    torch.manual_seed(123)
    ours = gpt_torch.create_dataloader_v1(text, 3, 16, 16, shuffle=True, drop_last=False)
    got = _passes(ours, 3)
    assert len(ours.sampler.orders) == 3
    flax = gpt_flax.create_dataloader_v1(text, 3, 16, 16, shuffle=True, drop_last=False, orders=ours.sampler.orders)
    replayed = _passes(flax, 3)
    for e, g, r in zip(expected, got, replayed, strict=True):
        for (ex, ey), (gx, gy), (rx, ry) in zip(e, g, r, strict=True):
            np.testing.assert_array_equal(gx, ex)
            np.testing.assert_array_equal(gy, ey)
            np.testing.assert_array_equal(rx, ex)
            np.testing.assert_array_equal(ry, ey)
    assert expected[0][0][0].tolist() != expected[1][0][0].tolist()  # each pass draws a new order
    with pytest.raises(RuntimeError, match="pass 4 over the data, but only 3 orders were recorded"):
        next(iter(flax))


def test_the_flax_loader_alone_shuffles_by_its_seed():
    text = the_verdict()[:3000]
    a = _passes(gpt_flax.create_dataloader_v1(text, 2, 16, 16, seed=5), 2)
    b = _passes(gpt_flax.create_dataloader_v1(text, 2, 16, 16, seed=5), 2)
    c = _passes(gpt_flax.create_dataloader_v1(text, 2, 16, 16, seed=6), 1)
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a[0] + a[1], b[0] + b[1], strict=True))
    assert not np.array_equal(a[0][0][0], c[0][0][0])
    assert not np.array_equal(a[0][0][0], a[1][0][0])


def test_batch_loader_counts_and_refusals():
    dataset = GPTDatasetV1(the_verdict()[:400], get_tokenizer(), 8, 8)
    n = len(dataset)
    assert len(BatchLoader(dataset, 3, drop_last=True)) == n // 3
    assert len(BatchLoader(dataset, 3)) == -(-n // 3)
    assert sum(len(x) for x, _ in BatchLoader(dataset, 3)) == n
    with pytest.raises(ValueError, match="not a permutation"):
        next(iter(BatchLoader(dataset, 3, shuffle=True, orders=[[0] * n])))
    with pytest.raises(ValueError, match="pass shuffle=True with them"):
        BatchLoader(dataset, 3, orders=[list(range(n))])
    for twin in (gpt_torch, gpt_flax):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
            twin.create_dataloader_v1("some text " * 50, batch_size=0, max_length=4, stride=4)
        with pytest.raises(ValueError, match="num_workers must be an integer >= 0, got -1"):
            twin.create_dataloader_v1("some text " * 50, batch_size=1, max_length=4, stride=4, num_workers=-1)
