"""Training data: megatron-core's BlendedMegatronDatasetBuilder + GPTDataset over indexed datasets.

    train, valid, test = build_gpt_datasets(
        ["0.7", "out/web_00000", "0.3", "out/code.manifest.json"],   # or ["out/a", "out/b"], or a string
        split="949,50,1", seq_length=1024, seed=1234, tokenizer=load_tokenizer("tok.model"),
        num_samples=(train_iters * global_batch, eval_samples, test_samples), cache_path="/scratch/idx-cache")
    sample = train[0]   # {"tokens", "labels", "loss_mask", "position_ids", "attention_mask"}

`data_path` follows Megatron's syntax: a flat list of prefixes (blended in proportion to their sizes)
or of weight/prefix pairs; a preprocess_data manifest stands for all its shards (a weighted manifest
shares its weight among its shards in proportion to their tokens). `split` is Megatron's "949,50,1"
(train/valid/test weights over each dataset's documents). A split with weight 0 returns None.

Before megatron-core opens anything, every prefix is checked (check_dataset_prefix: missing or
truncated .bin, bad .idx) and, when the data records its tokenizer (manifest / .meta.json), the
tokenizer given here must be the one the data was made with (same content hash and vocabulary).

Distributed building. build_gpt_datasets must be called on every rank, with torch.distributed
initialised (a 1-rank gloo group is enough on one process). megatron-core builds the index caches
(document / sample / shuffle indices, and the blending indices) on global rank 0 first, writes them
under `cache_path`, passes a barrier, and then every other rank loads them: the indices are computed
once. `is_built_on_rank` (default: every rank) says which ranks get dataset objects; the others get
None.

Multi-node without a shared file system. megatron-core writes the caches only on global rank 0 and
expects the other ranks to find them at `cache_path`; on another node's local disk they are absent and
those ranks fail with FileNotFoundError. What is needed then:
  * the .bin/.idx files (and manifests) at the same path on every node (copy them to node-local disk);
  * a node-local `cache_path` (e.g. /tmp or $SLURM_TMPDIR), built once per node by local rank 0:
    pass node_local_cache=True (the trainer's --data-cache-node-local). Then local rank 0 of every node except the first builds its node's
    caches in a short single-process helper (python -m megatron_tempnet.data.datasets, a 1-rank gloo
    group, the same arguments: the caches are deterministic and named by a hash of the arguments, never
    of the path or the rank), all ranks pass a barrier, and then the normal build finds every cache
    present. LOCAL_RANK (torchrun) or SLURM_LOCALID (srun) tells the local rank. Alternatively, build
    the caches beforehand with the same helper and copy the cache folder to every node.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from typing import Callable, List, Optional, Sequence, Tuple, Union

from megatron_tempnet.data.indexed import (  # noqa: F401  (re-exported: the checks live with the format)
    MANIFEST_SUFFIX,
    DatasetError,
    check_dataset_prefix,
    check_tokenizer_matches,
    read_json,
    tokenizer_info_for,
    tokens_in_sequence_range,
)
from megatron_tempnet.data.token_check import check_token_content, token_stats

logger = logging.getLogger(__name__)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _is_manifest(p: str) -> bool:
    return p.endswith(MANIFEST_SUFFIX) or (p.endswith(".json") and os.path.isfile(p))


def _manifest_shards(manifest: str) -> Tuple[List[str], List[int]]:
    man = read_json(manifest)
    keys = list((man.get("prefixes") or {}).keys())
    if len(keys) != 1:
        raise DatasetError(
            f"{manifest} is not a single-key preprocess_data manifest (keys {keys}); pass its shard prefixes instead"
        )
    base = os.path.dirname(os.path.abspath(manifest))
    prefixes, tokens = [], []
    for s in man.get("shards", []):
        d = s["datasets"][keys[0]]
        p = d["prefix"]
        prefixes.append(p if os.path.isabs(p) else os.path.join(base, p))
        tokens.append(int(d["tokens"]))
    if not prefixes:
        raise DatasetError(f"{manifest} lists no shards: its preprocess_data run wrote nothing")
    if not man.get("complete", False):
        raise DatasetError(
            f"{manifest} belongs to an unfinished preprocess_data run; rerun the same command to complete it"
        )
    return prefixes, tokens


def parse_data_path(data_path: Union[str, Sequence[str]]) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron's --data-path syntax -> (prefixes, weights or None); manifests expand to their shards."""
    items = data_path.split() if isinstance(data_path, str) else [str(x) for x in data_path]
    if not items:
        raise DatasetError("empty data path: pass dataset prefixes (see tools/preprocess_data.py)")
    weighted = len(items) % 2 == 0 and all(_is_number(items[i]) for i in range(0, len(items), 2))
    if not weighted and any(_is_number(x) and not os.path.exists(x + ".idx") for x in items):
        raise DatasetError(
            f"data path {items} mixes weights and prefixes unevenly; use 'w1 prefix1 w2 prefix2 ...' or prefixes only"
        )
    pairs = [(float(items[i]), items[i + 1]) for i in range(0, len(items), 2)] if weighted else [(None, x) for x in items]
    prefixes: List[str] = []
    weights: List[float] = []
    for w, p in pairs:
        if w is not None and w < 0:
            raise DatasetError(f"negative weight {w} for {p} in the data path")
        if _is_manifest(p):
            shard_prefixes, tokens = _manifest_shards(p)
            total = sum(tokens) or 1
            prefixes.extend(shard_prefixes)
            if w is not None:
                weights.extend(w * t / total for t in tokens)
        else:
            for ext in (".bin", ".idx"):
                if p.endswith(ext):
                    p = p[: -len(ext)]
            prefixes.append(p)
            if w is not None:
                weights.append(w)
    return prefixes, (weights if weighted else None)


def check_split_sizes(prefix: str, split: str, seq_length: int) -> None:
    """Each split with a weight holds at least one sample of `prefix`. megatron-core asserts (blends) or loops
    forever (requested samples) on a split too small for one sequence: refuse it here with the numbers."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    n_seq = check_dataset_prefix(prefix)["sequence_count"]
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for name, bounds in zip(("train", "valid", "test"), matrix):
        if bounds is None:
            continue
        beg, end = int(round(bounds[0] * n_seq)), int(round(bounds[1] * n_seq))
        n_tok = tokens_in_sequence_range(prefix, beg, end)
        if n_tok < seq_length + 1:
            raise DatasetError(
                f"the {name} split of {prefix} ({end - beg} of {n_seq} documents, split {split!r}) has {n_tok} "
                f"tokens, fewer than one sample needs (seq_length + 1 = {seq_length + 1}); use fewer, larger "
                f"shards (tools/merge_datasets.py), a split that gives {name} more (or 0), or a shorter seq_length"
            )


def require_train_and_valid(split: str) -> None:
    """Training needs documents in the first two splits (the test split may be empty)."""
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    try:
        weights = parse_and_normalize_split(split)
    except (AssertionError, ValueError):
        weights = [float("nan")]
    if not all(w == w for w in weights):  # nan: no numbers, or all of them 0
        raise DatasetError(f"--split {split!r} is not train,valid,test weights with a positive sum; e.g. 949,50,1")
    for name, w in zip(("training", "validation"), weights):
        if w <= 0:
            raise DatasetError(f"--split {split} leaves no {name} documents; give both the first and second split "
                               "a weight (e.g. 949,50,1)")


def _local_rank() -> Optional[int]:
    for var in ("LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var])
    return None


def _check_inputs(prefixes: list, split: str, seq_length: int, tokenizer, cache_path: Optional[str],
                  check_tokenizer: bool, built_here: bool) -> None:
    """Every prefix readable, made with this tokenizer, its tokens inside the vocabulary and its splits long
    enough, before megatron-core opens anything (see the module docstring)."""
    import torch

    if check_tokenizer:  # one pass over each .bin on rank 0 fills the token-stats caches the others read
        if torch.distributed.get_rank() == 0:
            for p in prefixes:
                try:
                    token_stats(p, cache_path)
                except (DatasetError, OSError):
                    pass  # every rank reports it below
        torch.distributed.barrier()

    if built_here:
        for p in prefixes:
            check_dataset_prefix(p)
            if check_tokenizer and tokenizer_info_for(p) is not None:
                check_tokenizer_matches(p, tokenizer.vocab_size, tokenizer=tokenizer if hasattr(tokenizer, "sha256") else None)
            if check_tokenizer:
                check_token_content(p, tokenizer.vocab_size, cache_path)
            check_split_sizes(p, split, seq_length)


def _build_node_local_caches(data_path, split: str, seq_length: int, seed: int, tokenizer, num_samples,
                             cache_path: Optional[str], options: dict) -> None:
    """Local rank 0 of every node but the first builds its node's index caches in a single-process helper
    (module docstring, "Multi-node without a shared file system"); every rank waits for them."""
    import torch

    if cache_path is None:
        raise DatasetError("node_local_cache=True needs a cache_path on node-local disk (e.g. $SLURM_TMPDIR/idx-cache)")
    local_rank = _local_rank()
    if local_rank is None:
        raise DatasetError(
            "node_local_cache=True needs the local rank: run under torchrun (LOCAL_RANK) or srun (SLURM_LOCALID)"
        )
    failed = torch.zeros(1)
    if local_rank == 0 and torch.distributed.get_rank() != 0:
        spec = dict(
            data_path=list(data_path) if not isinstance(data_path, str) else data_path,
            split=split, seq_length=seq_length, seed=seed, tokenizer=getattr(tokenizer, "path", None),
            num_samples=list(num_samples), cache_path=cache_path, options=options,
        )
        if spec["tokenizer"] is None:
            raise DatasetError("node_local_cache=True needs a tokenizer loaded from a file (load_tokenizer)")
        try:
            prebuild_caches_in_subprocess(spec)
        except DatasetError as e:
            logger.error("%s", e)
            failed += 1
    torch.distributed.all_reduce(failed)  # also the barrier: every node's caches exist after it
    if failed.item():
        raise DatasetError(f"building the node-local index caches failed on {int(failed.item())} node(s); see their logs")


def build_gpt_datasets(
    data_path: Union[str, Sequence[str]],
    split: str,
    seq_length: int,
    seed: int,
    tokenizer,
    num_samples: Tuple[Optional[int], Optional[int], Optional[int]],
    cache_path: Optional[str] = None,
    *,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    node_local_cache: bool = False,
    check_tokenizer: bool = True,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = True,
    mmap_bin_files: bool = True,
    num_dataset_builder_threads: int = 1,
):
    """(train, valid, test) GPTDatasets (or BlendedDatasets for several prefixes); None for an empty split
    or on ranks where is_built_on_rank() is False. Call on every rank. See the module docstring."""
    import torch

    if not torch.distributed.is_initialized():
        raise DatasetError(
            "build_gpt_datasets needs torch.distributed initialised (megatron-core builds the index caches on "
            "rank 0, then the others); on one process use a 1-rank gloo group: torch.distributed.init_process_group("
            "'gloo', init_method='tcp://127.0.0.1:29500', rank=0, world_size=1)"
        )
    if len(num_samples) != 3:
        raise DatasetError(f"num_samples must be (train, valid, test) (got {num_samples})")
    prefixes, weights = parse_data_path(data_path)
    built_here = is_built_on_rank or (lambda: True)
    _check_inputs(prefixes, split, seq_length, tokenizer, cache_path, check_tokenizer, built_here())
    if node_local_cache and torch.distributed.get_world_size() > 1:
        options = dict(reset_position_ids=reset_position_ids, reset_attention_mask=reset_attention_mask,
                       eod_mask_loss=eod_mask_loss, create_attention_mask=create_attention_mask,
                       mmap_bin_files=mmap_bin_files, check_tokenizer=False)
        _build_node_local_caches(data_path, split, seq_length, seed, tokenizer, num_samples, cache_path, options)

    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=cache_path,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        mmap_bin_files=mmap_bin_files,
        num_dataset_builder_threads=num_dataset_builder_threads,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), built_here, config)
    train, valid, test = builder.build()
    return train, valid, test


# ---------------------------------------------------------------------------------------------- cache prebuild


def prebuild_caches_in_subprocess(spec: dict, timeout: Optional[float] = None) -> None:
    """Build the index caches for `spec` in a fresh single-process helper (see the module docstring)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_file = f.name
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        env.pop(var, None)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "megatron_tempnet.data.datasets", "--prebuild", spec_file],
            env=env, capture_output=True, text=True, timeout=timeout,
        )
    finally:
        os.unlink(spec_file)
    if r.returncode != 0:
        raise DatasetError(f"building the index caches failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")


def _prebuild_main(spec_file: str) -> int:
    import torch

    from megatron_tempnet.data.tokenizer import load_tokenizer

    spec = read_json(spec_file)
    with tempfile.TemporaryDirectory() as d:
        torch.distributed.init_process_group("gloo", init_method=f"file://{d}/pg", rank=0, world_size=1)
        try:
            build_gpt_datasets(
                spec["data_path"], spec["split"], spec["seq_length"], spec["seed"], load_tokenizer(spec["tokenizer"]),
                tuple(spec["num_samples"]), spec["cache_path"], **spec.get("options", {}),
            )
        finally:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    if len(sys.argv) == 3 and sys.argv[1] == "--prebuild":
        sys.exit(_prebuild_main(sys.argv[2]))
    print("usage: python -m megatron_tempnet.data.datasets --prebuild SPEC.json", file=sys.stderr)
    sys.exit(2)
