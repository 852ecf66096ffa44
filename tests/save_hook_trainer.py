"""The trainer (`python -m megatron_tempnet.train` arguments) with a hook that stops its save of one iteration:

    python tests/save_hook_trainer.py ACTION:ITER[:STAGE] TRAIN_ARGS...

ACTION "pause" (wait to be killed) or "die" (exit with status 137 at once); STAGE "written" (default: all
files of the checkpoint written into its temporary folder, nothing published) or "renamed" (folder renamed,
tracker not yet replaced), the stages of megatron_tempnet.checkpoint.add_save_stage_hook. On reaching it,
rank R first writes SAVE_DIR/.test_hook_STAGE_R (holding the folder's path), so the test knows where it is.
Used by tests/test_checkpoint_crash.py."""
import os
import sys
import time
from pathlib import Path


def stop_in_save(spec: str):
    parts = spec.split(":")
    action, iteration, stage = parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "written"

    def hook(it: int, reached: str, folder: Path) -> None:
        import torch.distributed as dist

        if it != iteration or reached != stage:
            return
        (folder.parent / f".test_hook_{stage}_{dist.get_rank()}").write_text(str(folder))
        if action == "die":
            os._exit(137)
        while True:  # pause: the test kills us
            time.sleep(1)

    return hook


if __name__ == "__main__":  # dist_checkpointing's helper processes re-import this module
    from megatron_tempnet.checkpoint import add_save_stage_hook
    from megatron_tempnet.train import main

    add_save_stage_hook(stop_in_save(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
