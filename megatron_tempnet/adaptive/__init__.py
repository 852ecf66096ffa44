"""Adaptive decoding: which temperature, where.

An Adaptive Decoder head (Dhuliawala et al. 2024) on the frozen LM's last hidden state picks one temperature
of a discrete set per generated token or per response, trained with Latent Preference Optimization (LPO) from
a reward. Beside it, the tools to look at temperatures: shading a text by its per-token temperature.

  lm.py        the frozen LM at TP = 1: logits, TempNet's tau and the last hidden state
  head.py      the Adaptive Decoder head (token / sequence mode), its temperature set
  sampling.py  generation at fixed, TempNet or head-chosen temperatures
  rewards.py   reward callables (module:function) and reward model folders, checked
  lpo.py       the LPO loss, training loop and evaluation against fixed temperatures
  tasks.py     the built-in task mixture (deterministic vs varied prompts) and its reward
  config.py, train.py   the run behind tools/train_adaptive_decoder.py
  shade.py     HTML / PNG of a text shaded by temperature (tools/shade_tokens.py)
"""
