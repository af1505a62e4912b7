"""Print the config reference (every section and option, default and help) as Markdown.

    python scripts/config_reference.py            # to stdout
    python scripts/config_reference.py --readme   # rewrite the reference block in README.md
"""

import dataclasses
import typing
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchtitan.config.job_config import JobConfig  # noqa: E402

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def _default(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value).replace("'", '"')


def reference() -> str:
    cfg, lines = JobConfig(), []
    for section in dataclasses.fields(cfg):
        lines += [f"**[{section.name}]**", "", "| key | default | meaning |", "|---|---|---|"]
        obj = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            text = f.metadata.get("help", "")
            if typing.get_origin(hints[f.name]) is typing.Literal:  # the one declaration of the allowed values
                text += " (one of " + ", ".join(f"`{_default(a)}`" for a in typing.get_args(hints[f.name])) + ")"
            text = text.replace("|", "/")
            lines.append(f"| `{f.name}` | `{_default(getattr(obj, f.name))}` | {text} |")
        lines.append("")
    return "\n".join(lines)


def rewrite_readme(path: Path) -> None:
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{reference()}{END}{tail}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--readme"]:
        rewrite_readme(Path(__file__).resolve().parents[1] / "README.md")
    else:
        print(reference())
