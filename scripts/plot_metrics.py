"""Plot loss and tokens/s from a run's metrics.jsonl into a PNG.

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
    # A resumed run appends to the same file: keep the last record of each step.
    return sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])


def plot(records: list[dict], output: Path) -> Path:
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, [r["loss"] for r in records], marker=".")
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_tps.plot(steps, [r["tps"] for r in records], marker=".", color="tab:green")
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
