"""`--help` that shows, for every option, what it does, the values it takes and its default.

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)

Each option's help text gets "(choices: a, b)" when it has choices, and "(required)" or "(default: X)"
unless it states them itself; the description and epilog keep their line breaks (usage examples).
"""
from __future__ import annotations

import argparse


def describe_default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    default = action.default
    if isinstance(action, argparse.BooleanOptionalAction) or (isinstance(default, bool) and action.nargs != 0):
        return "default: " + ("unset" if default is None else "on" if default else "off")
    if action.nargs == 0:  # store_true / store_false / store_const: is the flag's effect there without the flag?
        return "default: " + ("on" if default == action.const else "off")
    if default is None:
        return "default: unset"
    if default == []:
        return "default: none"
    if isinstance(default, (list, tuple)):
        return "default: " + " ".join(map(str, default))
    return f"default: {default}"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if text == argparse.SUPPRESS or not action.option_strings or action.dest == "help":
            return text
        if action.choices is not None and "choices:" not in text:
            text += " (choices: " + ", ".join(map(str, action.choices)) + ")"
        if "default:" not in text and "(required" not in text:
            text += f" ({describe_default(action)})"
        return text.replace("%", "%%") if "%(" not in text else text
