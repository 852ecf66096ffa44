#!/usr/bin/env python
r"""Train an Adaptive Decoder head (per-token or per-response temperature choice) on a frozen LM with LPO.

Dhuliawala et al. 2024, "Adaptive Decoding via Latent Preference Optimization". The head reads the LM's last
hidden state and picks one temperature of a set (0 = greedy) per generated token (--mode token) or per
response (--mode sequence); LPO samples several responses per prompt, scores them with your reward, and
trains the head with a DPO loss on the log-probabilities of its latent choices (best vs worst response).

The built-in task mixture (a tiny LM is trained first, about a minute on 2 CPU cores):

    python tools/train_adaptive_decoder.py --config examples/configs/adaptive_decoder.yaml --save runs/ad

Your LM, prompts and reward:

    python tools/train_adaptive_decoder.py --checkpoint runs/my_lm --prompts prompts.txt \
        --reward my_rewards:score --temperatures 0 0.3 0.6 1.0 --mode sequence --save runs/ad

    # my_rewards.py:   def score(prompt: str, responses: list[str]) -> list[float]: ...
    # --reward may also name FILE.py:function or a Hugging Face reward model folder (transformers).

It ends with a table: mean reward of the trained head against every fixed temperature of its set, on the
same prompts (held-out ones with --task-mixture or --eval-prompts-file). Output in --save: adaptive_decoder.pt
and .json (the head), history.json, table.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from megatron_tempnet.adaptive.train import main
    from megatron_tempnet.training.in_process import train_mixture_lm

    sys.exit(main(doc=__doc__, train_mixture_lm=train_mixture_lm))
