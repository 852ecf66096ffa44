"""The step-extension interface (training/extensions.py): when the training step and the evaluation call each
hook, with what, and that what the hooks return reaches the schedule and the metrics."""
from helpers import tiny_config

from megatron_tempnet.training.extensions import StepExtension


class Recorder(StepExtension):
    """A step extension that takes each schedule's micro-batches itself and hands them back to the schedule."""

    def __init__(self):
        self.calls, self.taken, self.seen = [], [], []

    def before_schedule(self, model, data_iterators, num_microbatches):
        self.calls.append(("before_schedule", num_microbatches))
        self.taken = [next(data_iterators[0]) for _ in range(num_microbatches)]
        return [iter(self.taken)]

    def before_forward(self, chunk, batch):
        self.calls.append("before_forward")
        self.seen.append(batch)

    def metrics(self, tokens):
        self.calls.append("metrics")
        return {"recorded_tokens": tokens}


def test_hooks_run_in_order_and_their_results_reach_the_step(single_rank):
    from megatron_tempnet.training import extensions
    from megatron_tempnet.training.loop import build_datasets, data_iterators, setup_run
    from megatron_tempnet.training.step import evaluate, train_step

    cfg = tiny_config(tempnet=False)  # 8 samples per step in micro-batches of 2: 4 micro-batches
    model, optimizer, scheduler = setup_run(cfg)
    assert extensions.attached(model) == ()  # no attention transfer: no extension
    rec = Recorder()
    extensions.attach(model, [None, rec])
    assert extensions.attached(model) == (rec,)
    train_ds, valid_ds = build_datasets(cfg)
    metrics = train_step(cfg, model, optimizer, scheduler, data_iterators(cfg, train_ds, 0, 1))
    assert rec.calls == [("before_schedule", 4)] + ["before_forward"] * 4 + ["metrics"]
    assert all(a is b for a, b in zip(rec.seen, rec.taken)) and len(rec.seen) == 4  # the replayed micro-batches
    assert metrics["recorded_tokens"] == metrics["tokens"] == 8 * cfg.model.seq_length
    rec.calls.clear()
    out = evaluate(cfg, model, data_iterators(cfg, valid_ds, 0, 1), 2)
    assert rec.calls == ([("before_schedule", 4)] + ["before_forward"] * 4) * 2 + ["metrics"]  # once per evaluation
    assert out["recorded_tokens"] == out["tokens"] == 2 * 8 * cfg.model.seq_length
