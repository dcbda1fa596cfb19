"""Dataset store: atomic shards, manifest, split rule and the two readers (hand-built datasets)."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from regft import store as st

CLASSES = ["cat", "dog", "owl"]


def _items(per_class):
    return [(k, i) for k in range(len(CLASSES)) for i in range(per_class)]


def _image(k, i, size=8):
    return np.random.default_rng(k * 1000 + i).integers(0, 256, (size, size, 3), dtype=np.uint8)


def make_dataset(path, per_class=5, shard_size=4, complete=True):
    """A small dataset written through the store API, shaped like regft.generate's output."""
    items = _items(per_class)
    records = []
    for s in range(0, len(items), shard_size):
        chunk = items[s:s + shard_size]
        table = st.shard_table([f"{k:05d}-{i:06d}" for k, i in chunk], [k for k, _ in chunk],
                               [CLASSES[k] for k, _ in chunk], [f"a {CLASSES[k]}" for k, _ in chunk],
                               [k * 100 + i for k, i in chunk],
                               [st.encode_png(_image(k, i)) for k, i in chunk])
        records.append(st.write_shard(path, s // shard_size, table))
    manifest = {
        "complete": complete, "shards": records if complete else [],
        "task": {"classnames": CLASSES}, "settings": {"output_size": 8},
        "layout": {"shard_size": shard_size, "num_shards": len(records)},
        "class_counts": [per_class] * len(CLASSES),
    }
    st.write_manifest(path, manifest)
    return manifest


def test_split_rule_is_a_fixed_hash_of_the_item_id():
    ids = [f"{k:05d}-{i:06d}" for k in range(100) for i in range(100)]
    splits = [st.split_of(i) for i in ids]
    assert splits == [st.split_of(i) for i in ids]
    assert 0.09 < splits.count("val") / len(splits) < 0.11
    assert all(st.split_of(i, 0.0) == "train" for i in ids[:100])
    # a larger val fraction only moves items from train to val (the rule is a threshold)
    val_10 = {i for i in ids if st.split_of(i, 0.1) == "val"}
    assert val_10 <= {i for i in ids if st.split_of(i, 0.3) == "val"}
    with pytest.raises(ValueError, match="val_fraction"):
        st.split_of("x", 1.0)


def test_shards_are_committed_atomically_and_temp_files_never_listed(tmp_path):
    path = str(tmp_path / "ds")
    make_dataset(path)
    assert sorted(st.list_shards(path)) == [0, 1, 2, 3]
    assert not os.listdir(tmp_path / "ds" / st.TMP_DIR)  # every temp file was moved into place
    # a leftover temp file from a killed writer, and a stray file, are not shards
    (tmp_path / "ds" / st.TMP_DIR / "shard-00004.parquet.abc").write_bytes(b"half")
    (tmp_path / "ds" / st.SHARDS_DIR / "notes.txt").write_text("x")
    assert sorted(st.list_shards(path)) == [0, 1, 2, 3]
    # 5 per class, 4 per shard: shard 1 = items 4..7 in item_id order, across a class boundary
    assert st.shard_item_ids(path, 1) == ["00000-000004", "00001-000000", "00001-000001",
                                          "00001-000002"]
    (tmp_path / "ds" / st.SHARDS_DIR / st.shard_name(2)).write_bytes(b"not parquet")
    assert st.shard_item_ids(path, 2) is None and st.shard_record(path, 2) is None
    st.clear_tmp(path)
    assert not (tmp_path / "ds" / st.TMP_DIR).exists()


def test_shard_record_checksum_matches_the_file(tmp_path):
    import hashlib

    path = str(tmp_path / "ds")
    manifest = make_dataset(path)
    rec = st.shard_record(path, 0)
    assert rec == manifest["shards"][0]
    data = (tmp_path / "ds" / rec["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == rec["sha256"] and len(data) == rec["bytes"]
    assert pq.read_schema(tmp_path / "ds" / rec["file"]).names == st.SCHEMA.names


def test_writability_check_names_the_store(tmp_path):
    assert st.check_writable(str(tmp_path / "new" / "store")) is None
    assert not (tmp_path / "new").exists()  # the check leaves nothing behind
    blocker = tmp_path / "file"
    blocker.write_text("x")
    problem = st.check_writable(str(blocker / "store"))
    assert problem and "--store" in problem and str(blocker) in problem


def test_manifest_missing_or_incomplete_is_a_clear_error(tmp_path):
    with pytest.raises(st.DatasetNotReady, match="python -m regft.generate"):
        st.load_manifest(str(tmp_path / "nothing"))
    path = str(tmp_path / "ds")
    make_dataset(path, complete=False)
    with pytest.raises(st.DatasetNotReady, match="incomplete .4/4 shards.*re-run"):
        st.TorchImageDataset(path)


def test_png_round_trip_and_bicubic_resize():
    img = _image(1, 2, size=32)
    assert np.array_equal(np.asarray(st.decode_image(st.encode_png(img))), img)
    assert st.resize(img, 224).shape == (224, 224, 3)
    assert st.resize(img, 32) is img


def test_torch_dataset_splits_partition_the_data(tmp_path):
    path = str(tmp_path / "ds")
    make_dataset(path, per_class=20, shard_size=7)
    parts = {s: st.TorchImageDataset(path, split=s, val_fraction=0.25) for s in ("train", "val", "all")}
    assert len(parts["train"]) + len(parts["val"]) == len(parts["all"]) == 60
    assert set(parts["train"].item_ids).isdisjoint(parts["val"].item_ids)
    assert all(st.split_of(i, 0.25) == "val" for i in parts["val"].item_ids)
    assert Counter(parts["all"].labels.tolist()) == {0: 20, 1: 20, 2: 20}
    image, label = parts["all"][21]  # item 00001-000001
    assert label == 1 and np.array_equal(np.asarray(image), _image(1, 1))
    t = st.TorchImageDataset(path, split="all", transform=lambda im: np.asarray(im).shape)
    assert t[0] == ((8, 8, 3), 0)
    assert parts["all"].classnames == CLASSES
    with pytest.raises(ValueError, match="split must be one of"):
        st.TorchImageDataset(path, split="test")


@pytest.mark.timeout(300)
def test_ray_dataset_reads_the_same_split(tmp_path, ray_local):
    from regft.train import read_ray_dataset

    path = str(tmp_path / "ds")
    make_dataset(path, per_class=20, shard_size=7)
    train = read_ray_dataset(path, "train", val_fraction=0.25).take_all()
    val = read_ray_dataset(path, "val", val_fraction=0.25).take_all()
    torch_val = st.TorchImageDataset(path, split="val", val_fraction=0.25)
    assert sorted(r["item_id"] for r in val) == sorted(torch_val.item_ids)
    assert len(train) + len(val) == 60
    assert set(train[0]) == set(st.SCHEMA.names)
    row = next(r for r in train if r["item_id"] == train[0]["item_id"])
    k, i = (int(x) for x in row["item_id"].split("-"))
    assert np.array_equal(np.asarray(st.decode_image(row["image"])), _image(k, i))


def test_split_blocks_join_whole_shards_up_to_the_block_size(tmp_path):
    """regft.train.cached_train_split's blocks: every row of the split once, in item_id order;
    shards are joined, never cut, until a block reaches block_bytes."""
    path = str(tmp_path / "ds")
    make_dataset(path, per_class=20, shard_size=7)  # 60 items in 9 shards
    # the reference, read without the store's readers: every shard, the train rows by split_of
    rows = pa.concat_tables([pq.read_table(p, columns=["item_id", "label", "image"])
                             for p in st.split_shards(path, "train", 0.25)[1]])
    whole = rows.filter(pa.array([st.split_of(i, 0.25) == "train"
                                  for i in rows.column("item_id").to_pylist()]))
    assert 0 < whole.num_rows < 60
    assert st.read_table(path, "train", 0.25, columns=["image", "label"]).equals(whole)
    one = list(st.split_blocks(path, "train", 0.25, ["image", "label"], block_bytes=2**40))
    assert len(one) == 1 and one[0].equals(whole)
    shard_bytes = max(pq.read_table(p).nbytes for p in st.split_shards(path, "train", 0.25)[1])
    small = list(st.split_blocks(path, "train", 0.25, ["image", "label"], block_bytes=2 * shard_bytes))
    assert 1 < len(small) < 9
    assert pa.concat_tables(small).equals(whole)
    ids = [b.column("item_id").to_pylist() for b in small]
    assert all(st.split_of(i, 0.25) == "train" for b in ids for i in b)
    assert sorted(i for b in ids for i in b) == [i for b in ids for i in b]
    assert small[0].column_names == [n for n in st.SCHEMA.names if n in ("item_id", "image", "label")]
