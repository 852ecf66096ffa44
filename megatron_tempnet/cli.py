"""Shared plumbing for the command-line tools (tools/*.py, the trainer, the generator): quiet imports and
user-error handling.

User errors (bad input, missing files, mismatched vocabularies) end the tool with exit status 1 and one
line "error: <problem and fix>" on stderr, without a traceback. Anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import logging
import sys
import warnings
from typing import Callable, Optional, Sequence


def quiet_megatron_import_warnings() -> None:
    # megatron-core warns at import time that Transformer Engine / Apex are absent: expected on CPU.
    warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=r".*(apex|transformer_engine|Apex|TransformerEngine).*")
    logging.getLogger("megatron").setLevel(logging.WARNING)


def user_error_types() -> tuple:
    from megatron_tempnet.data.indexed import DatasetError
    from megatron_tempnet.data.inputs import InputError
    from megatron_tempnet.data.tokenizer import TokenizerError, TrainError

    return (DatasetError, InputError, TokenizerError, TrainError, FileNotFoundError, PermissionError, IsADirectoryError)


def run(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    quiet_megatron_import_warnings()
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    try:
        return int(main(argv) or 0)
    except user_error_types() as e:
        msg = str(e)
        if isinstance(e, OSError) and e.filename:
            msg = f"{e.strerror}: {e.filename}"
        print(f"error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; completed shards are kept and a rerun resumes after them", file=sys.stderr)
        return 130
