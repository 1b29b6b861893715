"""The one training-data interface (gradreg.data.source.TrainSource): in memory and streamed
alike, batches, rows, the validation carve."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from gradreg import data
from gradreg.data import stream
from gradreg.data.source import TensorRows, TrainSource
from gradreg.data.validation import carve_validation
from gradreg.trainer import epoch_order


@pytest.fixture(scope="module")
def digits() -> data.DataBundle:
    return data.load("digits")


def _sources(bundle: data.DataBundle) -> list[TrainSource]:
    return [TrainSource.from_bundle(bundle), stream.from_bundle(bundle)]


@pytest.mark.parametrize("batch_size,world,start", [(100, 1, 0), (100, 2, 3), (64, 3, 5), (1437, 2, 0)])
def test_batches_are_the_permutations_rows_on_either_path(digits: data.DataBundle, batch_size: int, world: int,
                                                          start: int) -> None:
    order = epoch_order(7, 1, len(digits.train_y))
    steps = -(-len(order) // batch_size)
    for source in _sources(digits):
        for rank in range(world):
            got = list(source.batches(order, batch_size=batch_size, start=start, rank=rank, world=world))
            assert [b.step for b in got] == list(range(start, steps))
            for b in got:
                # by hand: the global batch is a slice of the permutation, this rank takes every world-th row
                global_rows = order.tolist()[b.step * batch_size:(b.step + 1) * batch_size]
                mine = global_rows[rank::world]
                assert b.index.tolist() == mine and b.global_size == len(global_rows)
                assert b.rows.tolist() == list(range(len(global_rows)))[rank::world]
                assert b.share == len(mine) / len(global_rows)
                assert torch.equal(b.x, digits.train_x[mine]) and torch.equal(b.y, digits.train_y[mine])


def test_read_and_setup_rows_agree_between_paths(digits: data.DataBundle) -> None:
    memory, streamed = _sources(digits)
    index = torch.tensor([5, 0, 1436, 5])
    for source in (memory, streamed):
        x, y = source.read(index)
        assert torch.equal(x, digits.train_x[index]) and torch.equal(y, digits.train_y[index])
    # every row when held; a prefix of at most SETUP_ROWS when streamed (all 1,437 here)
    assert torch.equal(memory.setup_images(), digits.train_x)
    assert torch.equal(streamed.setup_images(), digits.train_x[:stream.SETUP_ROWS])


def test_one_validation_carve_for_both_paths(digits: data.DataBundle) -> None:
    memory, streamed = (carve_validation(s, fraction=0.25) for s in _sources(digits))
    assert isinstance(memory.rows, TensorRows) and isinstance(streamed.rows, stream.DatasetRows)
    assert memory.name == streamed.name == "digits[validation 0.25]"
    assert torch.equal(memory.test_x, streamed.test_x) and torch.equal(memory.test_y, streamed.test_y)
    assert torch.equal(memory.train_y, streamed.train_y)
    assert len(memory) + len(memory.test_y) == len(digits.train_y)
    everything = torch.arange(len(memory))
    assert torch.equal(memory.read(everything)[0], streamed.read(everything)[0])
    # the held-out part and the rest partition the training split: each training image exactly once
    seen = torch.cat([memory.read(everything)[0], memory.test_x]).flatten(1)
    assert Counter(tuple(r.tolist()) for r in seen) == Counter(tuple(r.tolist()) for r in digits.train_x.flatten(1))


def test_the_held_out_split_is_read_only_when_asked(digits: data.DataBundle) -> None:
    class NoTest:
        def __getattr__(self, name: str) -> object:
            if name in ("test_x", "test_y"):
                raise AssertionError(f"the test split was read ({name})")
            return getattr(digits, name)

    source = TrainSource.from_bundle(NoTest())  # type: ignore[arg-type]
    carved = carve_validation(source.to(torch.device("cpu")), fraction=0.2)
    assert len(carved.test_y) == len(digits.train_y) - len(carved)
    with pytest.raises(AssertionError, match="test split was read"):
        source.summary()


def test_the_trainer_never_names_a_data_path() -> None:
    """The loop's code sees a TrainSource only: it names no kind of rows nor any DataLoader
    machinery (read from its syntax tree; docstrings may speak of both paths)."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[1] / "src" / "gradreg" / "trainer.py").read_text(encoding="utf-8"))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    paths = {"TensorRows", "DatasetRows", "StreamingData", "DataLoader", "ShardSampler", "epoch_loader", "stream"}
    assert not names & paths, names & paths
