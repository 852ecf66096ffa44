"""Dataset checks and build_gpt_datasets (megatron-core's BlendedMegatronDatasetBuilder + GPTDataset)."""
import json
import os
import random
import shutil
import struct

import pytest
import torch

from megatron_tempnet.data.datasets import (
    DatasetError,
    build_gpt_datasets,
    check_dataset_prefix,
    check_tokenizer_matches,
    parse_data_path,
)
from megatron_tempnet.data.preprocess import PreprocessConfig, preprocess
from megatron_tempnet.data.tokenizer import load_tokenizer, train_sentencepiece

WORDS = "the of and data model token layer tensor rank shard loss sample batch def return".split()


def texts(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) + "\n" for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    tok = train_sentencepiece(texts(200, 1), str(d / "tok"), 300, threads=1)["model"]
    src = d / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(80)))
    man = preprocess(PreprocessConfig(inputs=[str(src)], output_prefix=str(d / "c"), tokenizer=tok,
                                      append_eod=True, shards=2, workers=1, progress=False))
    return {"dir": d, "tok": tok, "manifest": str(d / "c.manifest.json"),
            "prefixes": [str(d / p) for p in man["prefixes"]["text"]]}


@pytest.fixture(scope="module")
def process_group():
    """A 1-rank gloo group (reused if the session already has one)."""
    if torch.distributed.is_initialized():
        yield
        return
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        torch.distributed.init_process_group("gloo", init_method=f"file://{d}/pg", rank=0, world_size=1)
        yield
        torch.distributed.destroy_process_group()


def copy_prefix(prefix, dest):
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, str(dest) + ext)
    return str(dest)


# ---------------------------------------------------------------------------------------------- checks


def test_check_dataset_prefix_accepts_good_data(data):
    info = check_dataset_prefix(data["prefixes"][0])
    assert info["documents"] == 40 and info["dtype"] == "uint16" and info["tokens"] > 0
    assert check_dataset_prefix(data["prefixes"][0] + ".bin")["prefix"] == data["prefixes"][0]


def test_idx_without_bin(data, tmp_path):
    p = copy_prefix(data["prefixes"][0], tmp_path / "x")
    os.remove(p + ".bin")
    with pytest.raises(DatasetError, match=r"x\.idx exists but its data file .*x\.bin is missing"):
        check_dataset_prefix(p)


def test_truncated_bin(data, tmp_path):
    p = copy_prefix(data["prefixes"][0], tmp_path / "x")
    size = os.path.getsize(p + ".bin")
    with open(p + ".bin", "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(DatasetError, match=rf"is {size - 10} bytes but .* implies {size} bytes .*truncated"):
        check_dataset_prefix(p)


def test_bad_magic_version_and_truncated_idx(data, tmp_path):
    p = copy_prefix(data["prefixes"][0], tmp_path / "x")
    raw = open(p + ".idx", "rb").read()
    open(p + ".idx", "wb").write(b"NOTMEGA\x00\x00" + raw[9:])
    with pytest.raises(DatasetError, match="not a Megatron index file"):
        check_dataset_prefix(p)
    open(p + ".idx", "wb").write(raw[:9] + struct.pack("<Q", 2) + raw[17:])
    with pytest.raises(DatasetError, match="index version 2"):
        check_dataset_prefix(p)
    open(p + ".idx", "wb").write(raw[:-8])
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        check_dataset_prefix(p)


def test_missing_prefix_names_the_fix(data, tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*preprocess_data"):
        check_dataset_prefix(str(tmp_path / "nothing"))
    # the output prefix of a sharded run is not itself a dataset: point at the shards / manifest
    with pytest.raises(DatasetError, match="sharded output"):
        check_dataset_prefix(str(data["dir"] / "c"))


def test_check_tokenizer_matches(data, tmp_path):
    info = check_tokenizer_matches(data["manifest"], 300)
    assert info["vocab_size"] == 300
    check_tokenizer_matches(data["prefixes"][1], 300, tokenizer=load_tokenizer(data["tok"]))
    check_tokenizer_matches(data["prefixes"][0], 384, make_vocab_size_divisible_by=128)  # padded vocabulary
    with pytest.raises(DatasetError, match=r"vocabulary of 300 ids .* model's vocabulary size is 32000.*--vocab-size 300"):
        check_tokenizer_matches(data["manifest"], 32000)
    with pytest.raises(DatasetError, match=r"300 .* 256"):
        check_tokenizer_matches(data["prefixes"][0], 256)
    other = train_sentencepiece(texts(200, 7) + ["zzz qqq"], str(tmp_path / "other"), 300, threads=1)["model"]
    with pytest.raises(DatasetError, match="tokenizer mismatch.*--tokenizer-model"):
        check_tokenizer_matches(data["manifest"], 300, tokenizer=load_tokenizer(other))
    bare = copy_prefix(data["prefixes"][0], tmp_path / "bare")
    with pytest.raises(DatasetError, match="no tokenizer record"):
        check_tokenizer_matches(bare, 300)


def test_parse_data_path(data):
    assert parse_data_path(data["prefixes"]) == (data["prefixes"], None)
    assert parse_data_path(f"0.3 {data['prefixes'][0]} 0.7 {data['prefixes'][1]}.bin") == (data["prefixes"], [0.3, 0.7])
    prefixes, weights = parse_data_path(["2", data["manifest"]])
    assert prefixes == data["prefixes"] and abs(sum(weights) - 2) < 1e-9


# ---------------------------------------------------------------------------------------------- building


def test_build_gpt_datasets(data, process_group):
    tok = load_tokenizer(data["tok"])
    cache = data["dir"] / "cache"
    train, valid, test = build_gpt_datasets([data["manifest"]], "80,20,0", 32, 1234, tok, (50, 5, 0), str(cache))
    assert len(train) >= 50 and len(valid) >= 5 and test is None
    s = train[0]
    assert s["tokens"].shape == (32,) and s["labels"].shape == (32,)
    assert torch.equal(s["tokens"][1:], s["labels"][:-1])
    assert int(s["tokens"].max()) < tok.vocab_size
    n_cached = len(os.listdir(cache))
    assert n_cached > 0
    # same arguments: the same samples, and the caches are reused, not rebuilt
    train2, _, _ = build_gpt_datasets(data["prefixes"], "80,20,0", 32, 1234, tok, (50, 5, 0), str(cache))
    assert torch.equal(train2[7]["tokens"], train[7]["tokens"]) and len(os.listdir(cache)) == n_cached
    # weighted blend of the two shards
    w_train, _, _ = build_gpt_datasets(["1", data["prefixes"][0], "3", data["prefixes"][1]], "80,20,0", 32, 5, tok,
                                       (40, 4, 0), str(cache))
    assert len(w_train) == 40


def test_build_refuses_bad_data_before_megatron_opens_it(data, process_group, tmp_path):
    tok = load_tokenizer(data["tok"])
    p = copy_prefix(data["prefixes"][0], tmp_path / "t")
    with open(p + ".bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DatasetError, match="truncated"):
        build_gpt_datasets([p], "1,0,0", 32, 1, tok, (10, 0, 0), str(tmp_path / "cache"))
    with pytest.raises(DatasetError, match="fewer than one sample needs"):
        build_gpt_datasets(data["prefixes"], "98,1,1", 32, 1, tok, (10, 1, 1), str(tmp_path / "cache"))
    other = train_sentencepiece(texts(200, 9) + ["xyzzy"], str(tmp_path / "o"), 300, threads=1)["model"]
    with pytest.raises(DatasetError, match="tokenizer mismatch"):
        build_gpt_datasets(data["prefixes"], "1,0,0", 32, 1, load_tokenizer(other), (10, 0, 0), str(tmp_path / "cache"))


def _two_rank_build(data_prefixes, tok_path, cache_root):
    """On each rank: build with a shared cache folder, then as two single-rank "nodes" with node-local ones."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from megatron_tempnet.data.datasets import build_gpt_datasets as build
    from megatron_tempnet.data.tokenizer import load_tokenizer as load

    tok = load(tok_path)
    out = {}
    for mode in ("shared", "node_local"):
        if mode == "node_local":
            os.environ["LOCAL_RANK"] = "0"  # every rank is local rank 0 of its own node
        cache = os.path.join(cache_root, "shared" if mode == "shared" else f"node{rank}")
        train, _, _ = build(data_prefixes, "80,20,0", 32, 77, tok, (30, 3, 0), cache, node_local_cache=mode == "node_local")
        out[mode] = {"sample": train[3]["tokens"].tolist(), "len": len(train), "files": sorted(os.listdir(cache))}
    return out


@pytest.mark.slow
def test_two_ranks_build_once_and_node_local_caches(data, tmp_path):
    from helpers import spawn

    r0, r1 = spawn(_two_rank_build, 2, data["prefixes"], data["tok"], str(tmp_path))
    assert r0["shared"] == r1["shared"]  # rank 1 loaded what rank 0 built
    # node 1 built its own caches (in the helper process), identical to node 0's
    assert r0["node_local"] == r1["node_local"] and r1["node_local"]["sample"] == r0["shared"]["sample"]
    assert sorted(os.listdir(tmp_path / "node1")) == sorted(os.listdir(tmp_path / "node0")) == r0["shared"]["files"]
