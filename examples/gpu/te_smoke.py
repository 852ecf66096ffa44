"""Transformer Engine works here: it imports, says which FP8 recipes this GPU runs (as validation will), and one
te.Linear runs forward and backward in each of them close to its BF16 result. One JSON line; exit 1 if any
recipe that TE calls supported fails.

    python examples/gpu/te_smoke.py
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def main() -> int:
    import transformer_engine
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe as te_recipe

    from megatron_tempnet import fp8_support

    recipes = {"delayed": lambda: te_recipe.DelayedScaling(fp8_format=te_recipe.Format.HYBRID),
               "tensorwise": lambda: te_recipe.Float8CurrentScaling(fp8_format=te_recipe.Format.HYBRID),
               "blockwise": lambda: te_recipe.Float8BlockScaling(),
               "mxfp8": lambda: te_recipe.MXFP8BlockScaling()}
    torch.manual_seed(0)
    layer = te.Linear(1024, 1024, params_dtype=torch.bfloat16).cuda()
    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref = layer(x).float()
    row = {"transformer_engine": transformer_engine.__version__, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability())}
    failed = False
    for name, make in recipes.items():
        problem = fp8_support.recipe_problem(name)
        if problem:
            row[name] = {"supported": False, "why": problem}
            continue
        try:
            x.grad = None
            with te.fp8_autocast(enabled=True, fp8_recipe=make()):
                y = layer(x)
            y.float().sum().backward()
            rel = ((y.float() - ref).norm() / ref.norm()).item()
            ok = bool(torch.isfinite(x.grad).all()) and rel < 0.1
            row[name] = {"supported": True, "ran": ok, "rel_diff_vs_bf16": round(rel, 4)}
            failed |= not ok
        except Exception as exc:  # noqa: BLE001 - report the recipe that TE accepted but failed
            row[name] = {"supported": True, "ran": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            failed = True
    print(json.dumps(row))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
