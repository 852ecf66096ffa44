"""Check a job's inputs before it is queued: nothing is trained, no process group is started.

    python tools/check_job.py --world-size 16 --config run.yaml --data-path ... --save ckpt/
    python -m megatron_tempnet.train --dry-run ...          # the same checks, world size from the launcher

Each check reports OK or the problem with its fix:
  config       parallel sizes against the world size and the model shape, FP8 / TE, modes (finalize.validate)
  data         every --data-path prefix (or manifest) has its .idx and a .bin of the size the .idx implies
  tokenizer    the tokenizer loads, its vocabulary equals the model's, and the data was made with it
  checkpoint   --load / --pretrained-checkpoint: complete, same model shape, and splits at this TP/PP
  disk         the --save folder is writable and has room for the checkpoints about to be written
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from .. import runtime
from ..config import Config, ConfigError
from ..models.registry import get_family, model_dims


@dataclass
class CheckResult:
    name: str
    ok: bool
    message: str


def parameter_count(cfg: Config) -> int:
    """Parameters of the whole model (all ranks together, TempNet included), from its configuration."""
    dims = model_dims(cfg.model)
    tempnet = 0
    if cfg.tempnet.enabled:
        d = cfg.tempnet.hidden_size
        tempnet = d * dims.padded_vocab_size + d * d + 3 * d + 2 + (d if cfg.tempnet.scale_input else 0)
    return get_family(cfg.model.arch).parameter_count(dims) + tempnet


def checkpoint_bytes(cfg: Config) -> int:
    """Bytes of one checkpoint: weights in their dtype plus fp32 master weights (16-bit training) and
    Adam's two fp32 moments."""
    n = parameter_count(cfg)
    weight_bytes = 4 if cfg.train.precision in ("fp32",) or (cfg.train.precision == "auto" and not runtime.use_cuda()) else 2
    master = 0 if weight_bytes == 4 else 4
    return n * (weight_bytes + master + 8)


def _check(name: str, fn: Callable[[], str]) -> CheckResult:
    try:
        return CheckResult(name, True, fn() or "ok")
    except (ConfigError, ValueError, OSError) as err:
        return CheckResult(name, False, str(err))


def _check_data(cfg: Config) -> str:
    """What build_datasets would refuse: missing or truncated files, bad pointers, token ids outside the
    vocabulary, a split without training or validation documents, a split too small for one sample."""
    from ..data.datasets import check_split_sizes, parse_data_path, require_train_and_valid
    from ..data.indexed import check_dataset_prefix, expand_data_prefixes
    from ..data.token_check import check_token_content

    if cfg.data.mock_data:
        return "mock data"
    if not cfg.data.data_path:
        raise ConfigError("no --data-path: pass preprocessed data (tools/preprocess_data.py) or --mock-data")
    prefixes, _ = parse_data_path(cfg.data.data_path)
    shards = expand_data_prefixes(prefixes)
    require_train_and_valid(cfg.data.split)
    for prefix in shards:
        check_dataset_prefix(prefix)
        if cfg.model.vocab_size is not None:
            check_token_content(prefix, cfg.model.vocab_size, cfg.data.data_cache_path)
        check_split_sizes(prefix, cfg.data.split, cfg.model.seq_length)
    checked = ("token ids in the vocabulary" if cfg.model.vocab_size is not None
               else "token ids not checked (no vocabulary)")
    return f"{len(shards)} dataset shard(s) complete, {checked}, every split holds a sample"


def _check_tokenizer(cfg: Config, tokenizer=None) -> str:
    """The tokenizer loads (or is `tokenizer`), its vocabulary is the model's, and the data was made with it.
    Fills in cfg.model.vocab_size from it (run_checks' own copy of the configuration)."""
    from ..data.datasets import parse_data_path
    from ..data.indexed import check_tokenizer_matches
    from ..finalize import vocabulary

    if cfg.data.mock_data:
        return f"mock data, vocabulary {cfg.model.vocab_size}"
    if not cfg.data.tokenizer_model:
        raise ConfigError("no --tokenizer-model: pass the tokenizer the data was preprocessed with")
    cfg.model.vocab_size, tokenizer = vocabulary(cfg, tokenizer)
    for prefix in parse_data_path(cfg.data.data_path)[0]:
        check_tokenizer_matches(prefix, cfg.model.vocab_size, tokenizer=tokenizer)
    return f"vocabulary {tokenizer.vocab_size} matches the model and the data"


def _check_checkpoint(cfg: Config) -> str:
    from ..checkpoint import check_layout_fits, check_model_matches, read_info, resolve_checkpoint, verify_checkpoint

    ck, p = cfg.checkpoint, cfg.parallel
    found = []
    for path, what, allow_empty in ((ck.load, "--load", True), (ck.pretrained_checkpoint, "--pretrained-checkpoint", False)):
        if not path:
            continue
        folder = resolve_checkpoint(path, allow_empty=allow_empty)
        if folder is None:
            found.append(f"{what} {path}: empty, the run starts from scratch")
            continue
        info = read_info(folder)
        check_model_matches(info["config"], cfg, str(folder), tempnet_optional=what == "--pretrained-checkpoint")
        check_layout_fits(info["config"]["model"], p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                          p.virtual_pipeline_model_parallel_size)
        verified = verify_checkpoint(folder, hashes=ck.verify_checkpoint)
        found.append(f"{what} {folder.name} fits, " + ("its files match their checksums" if verified and
                     ck.verify_checkpoint else "sizes checked" if verified else "unverified (no recorded checksums)"))
    return "; ".join(found) or "no checkpoint to load"


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _probe_writable(folder: Path, what: str) -> None:
    """Create and remove a file in `folder`: os.access says yes to root on a read-only mount."""
    try:
        fd, name = tempfile.mkstemp(prefix=".write_probe_", dir=folder)
        os.close(fd)
        os.remove(name)
    except OSError as err:
        raise ConfigError(f"{what}: {folder} is not writable ({err.strerror}); choose a folder you can write "
                          "to") from None


def check_save_folder(cfg: Config, copies: Optional[int] = None) -> str:
    """The --save folder is a folder (or can be made), is writable, and has room for `copies` checkpoints
    (default: the --keep-last ones plus the one being written). The trainer asks for one before its first
    step, so a run never trains only to find it cannot save."""
    ck = cfg.checkpoint
    if not ck.save:
        return "no --save"
    save = Path(ck.save)
    if save.exists() and not save.is_dir():
        raise ConfigError(f"--save {save} is a file; pass a folder (it is created if missing)")
    parent = _existing_parent(save.resolve())
    _probe_writable(parent, f"--save {save}")
    copies = copies if copies is not None else max(ck.keep_last, 1) + 1  # kept ones + the one being written
    one = checkpoint_bytes(cfg)
    need = one * copies
    free = shutil.disk_usage(parent).free
    if free < need:
        what = "one checkpoint needs" if copies == 1 else \
            f"{ck.keep_last or 'all'} kept checkpoint(s) plus the one being written need"
        raise ConfigError(
            f"--save {save}: {free / 2**30:.2f} GiB free on {parent}, but {what} about {need / 2**30:.2f} GiB; "
            "free space, lower --keep-last, or save elsewhere")
    return f"{free / 2**30:.1f} GiB free, about {need / 2**30:.2f} GiB needed"


def run_checks(cfg: Config, world_size: int, *, cuda_available: Optional[bool] = None,
               te_available: Optional[bool] = None, tokenizer=None) -> List[CheckResult]:
    """Every check, in order; later ones still run when an earlier one fails. `cfg` is not changed (the
    checks fill the vocabulary into a copy); `tokenizer`: the one already loaded for it, if any."""
    from ..finalize import validate

    cfg = copy.deepcopy(cfg)
    cuda = runtime.use_cuda() if cuda_available is None else cuda_available
    te = runtime.transformer_engine_available() if te_available is None else te_available
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    tokenizer_check = _check("tokenizer", lambda: _check_tokenizer(cfg, tokenizer))  # first: it fills in the vocabulary
    config = _check("config", lambda: validate(cfg, world_size, cuda_available=cuda, te_available=te)
                    or f"world size {world_size} = TP {tp} x PP {pp} x DP {world_size // (tp * pp)}")
    results = [config, tokenizer_check, _check("data", lambda: _check_data(cfg))]
    if cfg.model.vocab_size is not None:
        results.append(_check("checkpoint", lambda: _check_checkpoint(cfg)))
        results.append(_check("disk", lambda: check_save_folder(cfg)))
    return results


def format_results(results: List[CheckResult]) -> str:
    width = max(len(r.name) for r in results)
    return "\n".join(f"{'OK  ' if r.ok else 'FAIL'} {r.name:<{width}}  {r.message}" for r in results)
