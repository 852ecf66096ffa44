"""No bad input passes silently: each is refused before any work with one line that names the problem and
the fix, printed once (rank 0), with a non-zero exit status, from a flag, a YAML file or the trainer alike."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest

from megatron_tempnet.config import Config, ConfigError, load_config
from megatron_tempnet.finalize import validate
from megatron_tempnet.config_fields import HELP
from megatron_tempnet.models.registry import family_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ", ".join(family_names())  # the registered families, as the messages list them
TINY = ["--mock-data", "--vocab-size", "250", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-interval", "0",
        "--eval-iters", "1", "--train-iters", "2", "--log-interval", "1"]
TEMPNET = ["--tempnet-enabled", "--tempnet-hidden-size", "16", "--dro-rho", "3.5"]  # target entropy log 250 - 3.5


def run_trainer(args: list, nproc: int = 1, timeout: float = 240, env_extra: dict | None = None):
    """(exit status, stdout, stderr) of `python -m megatron_tempnet.train` (through torchrun for nproc > 1)."""
    from helpers import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, MASTER_PORT=str(free_port()), **(env_extra or {}))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                 str(free_port())] if nproc > 1 else [sys.executable])
    proc = subprocess.Popen([*launcher, "-m", "megatron_tempnet.train", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        pytest.fail(f"the trainer hung (killed after {timeout} s):\n{err[-2000:]}")
    return proc.returncode, out, err


def our_error_lines(stderr: str) -> list:
    """The trainer's own error lines (torchrun's summary block repeats the root cause after "traceback :")."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(rc, out, err, *words):
    assert rc not in (0, None), (rc, out[-2000:], err[-2000:])
    lines = our_error_lines(err)
    assert len(lines) == 1, err[-3000:]
    assert not re.search(r'File ".*(megatron_tempnet|megatron/core)', err), err[-3000:]  # torchrun's own may stay
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------- numbers


def _refuse(argv, expected):
    cfg, _ = load_config(["--mock-data", "--vocab-size", "1000", *argv])
    with pytest.raises(ConfigError, match=re.escape(expected)):
        validate(cfg, 1, cuda_available=False, te_available=False)


@pytest.mark.parametrize("argv,expected", [
    (["--global-batch-size", "0"], "--global-batch-size must be >= 1; got 0"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1; got 0"),
    (["--hidden-size", "-64"], "--hidden-size must be >= 1; got -64"),
    (["--num-layers", "0"], "--num-layers must be >= 1; got 0"),
    (["--lr=-3e-3"], "--lr must be >= 0; got -0.003"),
    (["--seq-length", "0"], "--seq-length must be >= 1"),
    (["--train-iters", "0"], "--train-iters must be >= 1"),
    (["--eval-iters", "0"], "--eval-iters must be >= 1"),
    (["--log-interval", "0"], "--log-interval must be >= 1"),
    (["--tau-histogram-interval", "0"], "--tau-histogram-interval must be >= 1"),
    (["--save-interval", "-1"], "--save-interval must be >= 0"),
    (["--keep-last", "-1"], "--keep-last must be >= 0"),
    (["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size must be >= 1"),
    (["--adam-beta2", "1"], "--adam-beta2 must be >= 0 and < 1"),
    (["--hidden-dropout", "1.5"], "--hidden-dropout must be >= 0 and < 1"),
    (["--adam-eps", "0"], "--adam-eps must be > 0"),
    (["--tempnet-enabled", "--tempnet-tau-max", "inf"], "--tempnet-tau-max must be a finite number > 0; got inf"),
    (["--tempnet-enabled", "--tempnet-tau-min", "nan"], "--tempnet-tau-min must be a finite number"),
    (["--dro-rho", "nan"], "--dro-rho must be a finite number >= 0; got nan"),
    (["--dro-rho", "-1"], "--dro-rho must be >= 0; got -1.0"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--min-lr", "1", "--lr", "0.1"], "--min-lr 1.0 exceeds --lr 0.1, but the learning rate decays from --lr to "
                                       "--min-lr; pass a --min-lr of at most 0.1"),
    (["--tempnet-lr", "1e-6", "--tempnet-lr-schedule", "lm"], "--tempnet-min-lr 0.0003 exceeds --tempnet-lr 1e-06"),
    (["--distributed-timeout-minutes", "0"], "--distributed-timeout-minutes must be > 0"),
])
def test_meaningless_numbers_are_refused_at_validation(argv, expected):
    _refuse(argv, expected)


def test_a_yaml_number_is_checked_like_a_flag(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  dro_rho: .nan\n")
    _refuse(["--config", str(path)], "--dro-rho must be a finite number >= 0; got nan")


def test_a_yaml_choice_is_checked_like_a_flag(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  arch: gtp\n")
    _refuse(["--config", str(path)], f"--arch must be one of {ARCHS}; got 'gtp'")


def test_zero_global_batch_neither_passes_dry_run_nor_hangs():
    for extra in (["--dry-run"], []):
        rc, out, err = run_trainer([*TINY, "--global-batch-size", "0", *extra], timeout=300)  # (a loaded machine)
        assert rc == 2
        assert_one_line_error(rc, out, err, "--global-batch-size must be >= 1")


def test_micro_batches_refuse_a_batch_without_micro_batches():
    import torch

    from megatron_tempnet.training.batches import MockTokens, micro_batches

    with pytest.raises(ValueError, match="no micro-batch"):
        next(micro_batches(MockTokens(10, 4, 8, 0), consumed_samples=0, micro_batch_size=2, global_batch_size=0,
                           dp_rank=0, dp_size=1, device=torch.device("cpu")))


# ---------------------------------------------------------------------------------------------- YAML and flags


@pytest.mark.parametrize("yaml_text,words", [
    ("model:\n  hidden_sise: 64\n", ["unknown key 'model.hidden_sise'", "did you mean 'model.hidden_size'"]),
    ("model:\n  num_layers: four\n", ["model.num_layers must be int"]),
    ("model:\n  num_layers: [4\n", ["is not valid YAML"]),
    (None, ["not found", "--config"]),
])
def test_yaml_errors_are_one_line_on_rank_0(tmp_path, yaml_text, words):
    path = tmp_path / "c.yaml"
    if yaml_text is not None:
        path.write_text(yaml_text)
    rc, out, err = run_trainer(["--config", str(path)], nproc=2 if yaml_text and "four" in yaml_text else 1)
    assert_one_line_error(rc, out, err, *words)


@pytest.mark.parametrize("args,line", [
    (["--arch", "gtp"], f"error: --arch must be one of {ARCHS}; got 'gtp'"),  # the same words as from YAML
    (["--num-layers", "four"], "error: argument --num-layers: invalid int value: 'four' (see --help)"),
    (["--hidden-sise", "64"], "error: unrecognized arguments: --hidden-sise 64 (see --help)"),
])
def test_a_bad_flag_is_one_line(args, line):
    rc, out, err = run_trainer([*TINY, *args])
    assert rc == 2 and err.strip().splitlines() == [line]


# ---------------------------------------------------------------------------------------------- --help


def test_every_field_has_a_description():
    missing = [f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(s.default_factory)
               if f"{s.name}.{f.name}" not in HELP]
    assert not missing, f"describe these in megatron_tempnet/config_fields.py HELP: {missing}"


def test_trainer_help_shows_description_choices_and_default_of_every_flag():
    from megatron_tempnet.finalize import build_parser

    parser = build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and "(default:" in action.help, action.option_strings
        if action.dest in ("model.arch", "loss.loss_impl", "fp8.fp8_recipe"):
            assert "choices:" in action.help and action.metavar.startswith("{")
    text = subprocess.run([sys.executable, "-m", "megatron_tempnet.train", "--help"], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT, COLUMNS="200")).stdout
    assert re.search(rf"--arch \{{{','.join(family_names())}\}}\s+model family.*\(choices: {ARCHS}\) \(default: gpt\)",
                     text), text
    assert re.search(r"--dro-rho DRO_RHO\s+DRO radius.*\(must be >= 0\) \(default: unset\)", text), text


# ---------------------------------------------------------------------------------------------- data


def _write_megatron_dataset(prefix: str, documents: list) -> str:
    """A .bin/.idx as Megatron-LM writes it: no .meta.json sidecar, so no tokenizer record."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in documents:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 300-id tokenizer, and sidecar-less datasets: one within its vocabulary, one with ids up to 399."""
    import random

    from megatron_tempnet.data.tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    words = "the of and data model token layer tensor rank shard loss sample batch def return".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 80))) + "\n" for _ in range(200)]
    tok = train_sentencepiece(texts, str(d / "tok"), 300, threads=1)["model"]
    docs = [[rng.randrange(300) for _ in range(rng.randint(30, 60))] for _ in range(60)]
    good = _write_megatron_dataset(str(d / "good"), docs)
    beyond = _write_megatron_dataset(str(d / "beyond"), [*docs[:30], [5, 399, 7] * 20, *docs[30:]])
    empty = _write_megatron_dataset(str(d / "empty"), [])
    return {"dir": d, "tok": tok, "good": good, "beyond": beyond, "empty": empty}


def _data_args(data, prefix, *extra):
    return ["--data-path", prefix, "--tokenizer-model", data["tok"], "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--eval-interval", "0", "--eval-iters", "1", "--train-iters", "2", "--split", "90,10,0", *extra]


def test_token_ids_beyond_the_vocabulary_are_refused_and_the_scan_is_cached(data, monkeypatch):
    from megatron_tempnet.data import token_check
    from megatron_tempnet.data.indexed import DatasetError

    assert token_check.check_token_content(data["good"], 300)["max_id"] < 300
    with pytest.raises(DatasetError, match="holds token id 399, outside the model's vocabulary of 300 ids"):
        token_check.check_token_content(data["beyond"], 300)
    assert os.path.isfile(data["beyond"] + token_check.STATS_SUFFIX)
    monkeypatch.setattr(token_check, "_compute", lambda *a: pytest.fail("the cached scan was not used"))
    with pytest.raises(DatasetError, match="token id 399"):
        token_check.check_token_content(data["beyond"], 300)


def test_pointers_that_disagree_with_the_lengths_are_refused(data, tmp_path):
    import shutil
    import struct

    from megatron_tempnet.data.indexed import HEADER_BYTES, DatasetError, read_index_header
    from megatron_tempnet.data.token_check import check_token_content

    for ext in (".bin", ".idx"):
        shutil.copy(data["good"] + ext, str(tmp_path / "bad") + ext)
    s = read_index_header(str(tmp_path / "bad"))["sequence_count"]
    with open(tmp_path / "bad.idx", "r+b") as f:  # sequence 3 now starts 2 bytes early: it overlaps sequence 2
        f.seek(HEADER_BYTES + 4 * s + 8 * 3)
        (ptr,) = struct.unpack("<q", f.read(8))
        f.seek(HEADER_BYTES + 4 * s + 8 * 3)
        f.write(struct.pack("<q", ptr - 2))
    with pytest.raises(DatasetError, match="pointer of sequence 3 is not the sum of the lengths before it"):
        check_token_content(str(tmp_path / "bad"), 300)


@pytest.mark.slow
def test_trainer_refuses_out_of_vocabulary_data_at_tp2_and_dry_run_finds_it(data):
    rc, out, err = run_trainer(_data_args(data, data["beyond"], "--tensor-model-parallel-size", "2"), nproc=2)
    assert_one_line_error(rc, out, err, "token id 399", "vocabulary of 300 ids", "--tokenizer-model")
    rc, out, _ = run_trainer(_data_args(data, data["beyond"], "--dry-run"))
    assert rc == 2 and re.search(r"^FAIL data .*token id 399", out, re.M), out


@pytest.mark.parametrize("prefix,split,words", [
    ("good", "100,0,0", ["leaves no validation documents"]),
    ("empty", "90,10,0", ["the train split of", "has 0 tokens"]),
])
def test_dry_run_finds_what_the_trainer_would_refuse(data, prefix, split, words):
    from megatron_tempnet.config import load_config
    from megatron_tempnet.training.preflight import run_checks

    cfg, _ = load_config(_data_args(data, data[prefix], "--split", split))
    failures = {r.name: r.message for r in run_checks(cfg, 1, cuda_available=False, te_available=False) if not r.ok}
    for w in words:
        assert w in failures.get("data", ""), failures


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A save folder with two checkpoints (iterations 2 and 4) of a tiny run with TempNet."""
    save = tmp_path_factory.mktemp("ckpt") / "run"
    rc, out, err = run_trainer([*TINY, *TEMPNET, "--train-iters", "4",
                                "--save-interval", "2", "--keep-last", "0", "--save", str(save)])
    assert rc == 0, err[-3000:]
    return save


def _copy(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "run")


def _flip_64_bytes(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        data = f.read(64)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in data))


def test_every_file_of_a_checkpoint_has_a_recorded_checksum(saved):
    import json

    from megatron_tempnet.checkpoint import CHECKSUM_FILE, checkpoint_problems

    for it in ("iter_0000002", "iter_0000004"):
        files = json.loads((saved / it / CHECKSUM_FILE).read_text())["files"]
        on_disk = {p.name for p in (saved / it).iterdir()} - {CHECKSUM_FILE, "tempnet_checkpoint.json"}
        assert set(files) == on_disk and any(n.endswith(".distcp") for n in files)
        assert checkpoint_problems(saved / it) == ([], True)


def test_damage_is_found_by_size_or_hash_and_old_checkpoints_load_unverified(saved, tmp_path):
    from megatron_tempnet.checkpoint import CHECKSUM_FILE, checkpoint_problems

    run = _copy(saved, tmp_path)
    latest = run / "iter_0000004"
    distcp = sorted(latest.glob("*.distcp"))[0]
    _flip_64_bytes(distcp)
    assert checkpoint_problems(latest) == ([f"{distcp.name} differs from what was written (its sha256 changed)"], True)
    assert checkpoint_problems(latest, hashes=False) == ([], True)  # --no-verify-checkpoint: sizes only
    with open(distcp, "r+b") as f:
        f.truncate(100)
    assert "has 100 bytes" in checkpoint_problems(latest, hashes=False)[0][0]
    (latest / CHECKSUM_FILE).unlink()  # as written before checksums were recorded: the index still checks sizes
    assert "but the checkpoint's index reads up to byte" in checkpoint_problems(latest)[0][0]
    older = run / "iter_0000002"
    (older / CHECKSUM_FILE).unlink()
    assert checkpoint_problems(older) == ([], False)


def test_a_missing_latest_checkpoint_names_the_newest_complete_one(saved, tmp_path):
    import shutil

    from megatron_tempnet.checkpoint import CheckpointError, resolve_checkpoint

    run = _copy(saved, tmp_path)
    shutil.rmtree(run / "iter_0000004")
    with pytest.raises(CheckpointError, match=re.escape(f"is missing or incomplete; the newest complete checkpoint is "
                                                        f"{run / 'iter_0000002'}: resume with --load")):
        resolve_checkpoint(run)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_damaged_latest_checkpoint_is_refused_naming_the_last_good_one(saved, tmp_path, damage):
    run = _copy(saved, tmp_path)
    distcp = sorted((run / "iter_0000004").glob("*.distcp"))[0]
    _flip_64_bytes(distcp) if damage == "flip" else distcp.unlink()
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    rc, out, err = run_trainer([*TINY, *TEMPNET, "--train-iters", "6",
                                "--save", str(run), "--load", str(run)])
    line = assert_one_line_error(rc, out, err, f"checkpoint {run / 'iter_0000004'} is damaged: {distcp.name}",
                                 f"resume with --load {run / 'iter_0000002'}")
    assert ("sha256" in line) if damage == "flip" else ("is missing" in line)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before  # nothing written or removed


@pytest.mark.slow
def test_a_checkpoint_without_checksums_loads_and_says_it_is_unverified(saved, tmp_path):
    from megatron_tempnet.checkpoint import CHECKSUM_FILE

    run = _copy(saved, tmp_path)
    (run / "iter_0000004" / CHECKSUM_FILE).unlink()
    rc, out, err = run_trainer([*TINY, *TEMPNET, "--train-iters", "5",
                                "--load", str(run / "iter_0000004")])
    assert rc == 0, err[-3000:]
    assert "has no recorded checksums" in err and "loads unverified" in err


# ---------------------------------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_saves_like_sigterm_and_does_not_ask_for_a_requeue(tmp_path, nproc):
    import signal
    import time

    from helpers import free_port
    from launch import finish, torchrun, wait_for_line
    from megatron_tempnet.checkpoint import TRACKER_FILE
    from megatron_tempnet.training.signals import REQUEUE_MARKER

    save = tmp_path / "run"
    args = [*TINY, "--train-iters", "1000", "--save", str(save)]
    if nproc == 1:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
        env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, "-m", "megatron_tempnet.train", *args], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    else:
        proc = torchrun([*args, "--tensor-model-parallel-size", "2"], nproc=2)
    lines = []
    assert wait_for_line(proc, "iter      3/1000", 240, lines), "".join(lines)[-3000:]
    os.kill(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends (torchrun forwards it to its workers)
    if nproc == 1:  # the same Ctrl-C delivered twice in a row is still a clean stop (torchrun, sent a second
        time.sleep(0.1)  # one, stops waiting for its workers and kills them: its own rule)
        os.kill(proc.pid, signal.SIGINT)
    (rc, rest), = finish([proc], 240)
    out = "".join(lines) + rest
    assert "interrupted: finishing this step, then saving" in out, out[-3000:]
    stopped = re.search(r"stopped early \(signal SIGINT\) at iteration (\d+); exit status 130", out)
    assert stopped, out[-3000:]
    assert (save / TRACKER_FILE).read_text().strip() == stopped.group(1)
    assert not (save / REQUEUE_MARKER).exists()
    assert rc == (130 if nproc == 1 else 1), out[-3000:]  # torchrun ends with 1 when a worker failed


TOOLS = ["tools/build_stdlib_corpus.py", "tools/check_job.py", "tools/convert_to_hf.py", "tools/inspect_dataset.py",
         "tools/merge_datasets.py", "tools/preprocess_data.py", "tools/shade_tokens.py",
         "tools/train_adaptive_decoder.py", "tools/train_tokenizer.py", "-m megatron_tempnet.train"]


def option_blocks(help_text: str) -> dict:
    """{invocation: help} for every option of an argparse --help text."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        m = re.match(r"^  (-\S.*?)(?:\s{2,}(.*))?$", line)
        if m and not line.startswith("   "):
            current = m.group(1).strip()
            blocks[current] = m.group(2) or ""
        elif current and line.startswith(" " * 6) and line.strip():
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


@pytest.mark.slow  # ten interpreters that import torch
def test_every_tool_help_shows_description_choices_and_default_of_every_flag():
    procs = {t: subprocess.Popen([sys.executable, *t.split(), "--help"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=ROOT, COLUMNS="300"))
             for t in TOOLS}
    problems = []
    for tool, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (tool, err[-2000:])
        head = out.split("\n\n")
        assert len(head) > 2 and len(head[1].strip()) > 20, (tool, "no description")
        blocks = option_blocks(out)
        assert len(blocks) > 2, (tool, out)
        for invocation, text in blocks.items():
            if invocation.startswith("-h"):
                continue
            described = re.sub(r"\((default|choices|required|must be)[^)]*\)", "", text).strip()
            if not described:
                problems.append(f"{tool} {invocation}: no description")
            if "(default:" not in text and "(required" not in text:
                problems.append(f"{tool} {invocation}: no default")
            if "{" in invocation and "choices:" not in text:
                problems.append(f"{tool} {invocation}: no choices")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------- --save


def test_a_save_folder_without_room_for_one_checkpoint_is_refused(tmp_path, monkeypatch):
    import shutil

    from megatron_tempnet.training import preflight

    cfg, _ = load_config([*TINY, "--save", str(tmp_path / "run")])
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(ConfigError, match="but one checkpoint needs about .* GiB; free space"):
        preflight.check_save_folder(cfg, copies=1)


def test_a_read_only_save_folder_is_refused(tmp_path, monkeypatch):
    from megatron_tempnet.training import preflight

    def refuse(*a, **k):
        raise PermissionError(13, "Read-only file system")

    cfg, _ = load_config([*TINY, "--save", str(tmp_path / "run")])
    monkeypatch.setattr(preflight.tempfile, "mkstemp", refuse)
    with pytest.raises(ConfigError, match=f"--save {tmp_path / 'run'}: {tmp_path} is not writable"):
        preflight.check_save_folder(cfg, copies=1)


@pytest.mark.parametrize("save", ["/proc/ckpt", "a_file/ckpt"])
def test_the_trainer_refuses_an_unwritable_save_folder_before_its_first_step(tmp_path, save):
    (tmp_path / "a_file").write_text("x")
    save = save if save.startswith("/") else str(tmp_path / save)
    rc, out, err = run_trainer([*TINY, "--save", save])
    assert rc == 2 and "iter " not in out
    assert_one_line_error(rc, out, err, f"--save {save}", "is not writable", "choose a folder you can write to")


# ---------------------------------------------------------------------------------------------- in the trainer


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no validation split", "missing tokenizer"])
def test_errors_inside_the_trainer_are_one_line(data, case):
    args = (_data_args(data, data["good"], "--split", "100,0,0") if case == "no validation split" else
            _data_args(data, data["good"], "--tokenizer-model", str(data["dir"] / "nope.model")))
    rc, out, err = run_trainer(args, nproc=2)
    words = ["leaves no validation documents"] if case == "no validation split" else ["nope.model"]
    assert_one_line_error(rc, out, err, *words)
