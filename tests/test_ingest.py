"""regft.ingest: the worker-side train stream is a function of (seed, epoch) only."""
import numpy as np
import pyarrow as pa
import pytest
import torch
from torchvision import transforms

from regft import store as st
from regft.errors import UserError
from regft.images import encode_png
from regft.ingest import (
    SPLIT_MEMORY_SHARE,
    RankStream,
    available_memory_bytes,
    rank_steps,
    read_train_split,
    split_memory_problem,
)


def table(n: int = 24, size: int = 20) -> pa.Table:
    rng = np.random.default_rng(0)
    images = [encode_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    return pa.table({"image": images, "label": [i % 3 for i in range(n)]})


def random_aug():
    return transforms.Compose([transforms.RandomResizedCrop(12, scale=(0.3, 1.0)),
                               transforms.RandomHorizontalFlip()])


def batches(stream: RankStream, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in stream.epoch(epoch)]


def test_every_world_size_takes_the_same_global_batches_in_equal_disjoint_shares():
    one = rank_steps(24, 5, 3, steps=2, batch_per_rank=8, rank=0, world=1)
    shares = [rank_steps(24, 5, 3, steps=2, batch_per_rank=4, rank=r, world=2) for r in range(2)]
    for step in range(2):
        a, b = ({row for _, row in s[step]} for s in shares)
        assert not a & b and len(a) == len(b) == 4
        assert a | b == {row for _, row in one[step]}
    assert len({row for s in one for _, row in s}) == 16  # the tail short of a step is dropped


def test_each_epoch_and_seed_reads_another_order_and_too_few_rows_is_refused():
    order = lambda seed, epoch: [r for s in rank_steps(24, seed, epoch, steps=3, batch_per_rank=8,  # noqa: E731
                                                       rank=0, world=1) for _, r in s]
    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)
    assert sorted(order(0, 2)) == list(range(24))
    with pytest.raises(ValueError, match="need 32 rows"):
        rank_steps(24, 0, 1, steps=4, batch_per_rank=8, rank=0, world=1)


def test_the_stream_does_not_depend_on_the_decode_processes():
    t = table()
    streams = [RankStream(t, random_aug(), seed=3, steps=3, batch_per_rank=8, loader_workers=k)
               for k in (0, 1, 2)]
    for epoch in (1, 2):
        ref = batches(streams[0], epoch)
        assert len(ref) == 3 and ref[0][0].shape == (8, 3, 12, 12) and ref[0][0].dtype == torch.uint8
        for other in streams[1:]:
            for (x0, y0), (x1, y1) in zip(ref, batches(other, epoch), strict=True):
                assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_augmentations_differ_per_epoch_and_a_resumed_epoch_repeats_exactly():
    t = table()
    first = RankStream(t, random_aug(), seed=3, steps=1, batch_per_rank=24, loader_workers=0)
    e1, e2 = batches(first, 1), batches(first, 2)
    # the same rows in another order: put each epoch's images in row order, compare the crops
    def by_row(stream_batches, epoch):
        rows = [r for _, r in rank_steps(24, 3, epoch, steps=1, batch_per_rank=24, rank=0, world=1)[0]]
        x = stream_batches[0][0]
        return x[torch.argsort(torch.tensor(rows))]
    assert not torch.equal(by_row(e1, 1), by_row(e2, 2))
    resumed = RankStream(t, random_aug(), seed=3, steps=1, batch_per_rank=24, loader_workers=1)
    assert torch.equal(batches(resumed, 2)[0][0], e2[0][0])  # epoch 2 without epoch 1 before it


def test_decoding_in_the_training_process_leaves_its_generator_alone():
    stream = RankStream(table(), random_aug(), seed=3, steps=3, batch_per_rank=8, loader_workers=0)
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    for _ in stream.epoch(1):
        pass
    assert torch.equal(torch.rand(4), expected)


# ------------------------------------------------------------- memory guard ----
def written_split(tmp_path, n: int = 40) -> str:
    rng = np.random.default_rng(1)
    rows = [(f"{i % 4:04d}-{i:05d}", i % 4, f"c{i % 4}", f"a c{i % 4}", i,
             encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))) for i in range(n)]
    return st.write_dataset(str(tmp_path / "ds"), rows, "t", [f"c{k}" for k in range(4)], 32)


def test_the_split_is_read_when_its_copies_fit_and_refused_before_reading_when_not(tmp_path):
    dataset = written_split(tmp_path)
    split_bytes = st.split_disk_bytes(dataset, "train", 0.25)
    image_bytes = st.read_table(dataset, "train", 0.25, ["image"]).column("image").nbytes
    assert 0.5 * image_bytes < split_bytes < 2 * image_bytes  # the estimate is the split's size
    room = int(3 * split_bytes / SPLIT_MEMORY_SHARE) + 1
    table = read_train_split(dataset, 0.25, ["image", "label"], workers_on_node=3, available=room)
    assert table.num_rows == st.split_counts(dataset, 0.25)["train"]
    assert read_train_split(dataset, 0.25, ["label"], workers_on_node=8, available=None).num_rows
    with pytest.raises(UserError) as e:  # a fourth copy does not fit
        read_train_split(dataset, 0.25, ["image"], workers_on_node=4, available=room)
    message = str(e.value)
    assert " x 4 workers) would pass 70% of the" in message and "--ingest ray_data" in message
    assert len(message) < 200


def test_the_memory_guard_names_one_worker_plainly_and_reads_this_machine():
    problem = split_memory_problem(8e9, 1, int(10e9))
    assert problem.startswith("ingest worker: the train split in memory (8.0 GB) would pass 70% of "
                              "the 10.0 GB this node has available")
    assert split_memory_problem(7e9, 1, int(10e9)) is None
    available = available_memory_bytes()
    assert available is None or available > 0
