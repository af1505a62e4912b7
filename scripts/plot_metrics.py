"""Plot the training loss (with the validation loss beside it) and tokens/s from a run's metrics.jsonl into a PNG.

    python scripts/plot_metrics.py outputs/metrics.jsonl [--output outputs/metrics.png]
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"no metrics file at {path}: pass the metrics.jsonl of a run (in its dump folder)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"{path} has no records yet: train for at least one log step first")
    # A resumed run appends to the same file: the later value of a key wins. A validation result
    # of a step that was not a log step is a record of its own (step and val_* keys).
    by_step: dict[int, dict] = {}
    for r in records:
        by_step.setdefault(r["step"], {}).update(r)
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of the records that have ``key``."""
    return [(r["step"], r[key]) for r in records if r.get(key) is not None]


def _draw(ax, points: list[tuple[int, float]], **style) -> None:
    if points:
        ax.plot(*zip(*points), **style)


def plot(records: list[dict], output: Path) -> Path:
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(11, 4))
    _draw(ax_loss, series(records, "loss"), marker=".", label="training (window mean)")
    _draw(ax_loss, series(records, "val_loss"), marker="o", color="tab:red", label="validation")
    for key in sorted({k for r in records for k in r if k.startswith("val_loss/")}):
        _draw(ax_loss, series(records, key), marker="x", linestyle=":", label=key[len("val_loss/"):])
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    _draw(ax_tps, series(records, "tps"), marker=".", color="tab:green")
    ax_tps.set(xlabel="step", ylabel="tokens / s / device", title="throughput")
    for ax in (ax_loss, ax_tps):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path, help="path to metrics.jsonl")
    parser.add_argument("--output", type=Path, default=None, help="PNG path (default: beside metrics.jsonl)")
    args = parser.parse_args()
    out = plot(read_metrics(args.metrics), args.output or args.metrics.with_name("metrics.png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
