"""Plot the training loss (with the validation loss beside it) and tokens/s from a run's metrics.jsonl into a PNG.

    python scripts/plot_metrics.py outputs/metrics.jsonl [--output outputs/metrics.png] [--run_id ID | --all_runs]

Every record carries the ``run_id`` of the run that wrote it (records without one, from before run
ids, count as one legacy run). Two runs are never joined into one curve: by default the newest run
(the last to write) is drawn and one line says how many records of how many other runs were skipped;
``--run_id`` picks another, ``--all_runs`` draws each run as a curve of its own.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


LEGACY = "legacy"  # the run of records written before run ids


def read_runs(path: Path) -> dict[str, list[dict]]:
    """run_id -> that run's records by step, in the order the runs first wrote (the newest last)."""
    if not path.is_file():
        raise SystemExit(f"no metrics file at {path}: pass the metrics.jsonl of a run (in its dump folder)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"{path} has no records yet: train for at least one log step first")
    runs: dict[str, list[dict]] = {}
    for r in records:
        run_id = r.get("run_id") or LEGACY
        runs.setdefault(run_id, []).append(r)
    newest = records[-1].get("run_id") or LEGACY
    runs[newest] = runs.pop(newest)  # the run that wrote last is the newest, wherever it started
    return {run_id: by_step(rs) for run_id, rs in runs.items()}


def read_metrics(path: Path) -> list[dict]:
    """The newest run's records, one per step."""
    return list(read_runs(path).values())[-1]


def by_step(records: list[dict]) -> list[dict]:
    """One record per step: a resumed run appends to the same file, and the later value of a key
    wins. A validation result of a step that was not a log step is a record of its own."""
    steps: dict[int, dict] = {}
    for r in records:
        steps.setdefault(r["step"], {}).update(r)
    return [steps[s] for s in sorted(steps)]


def choose(runs: dict[str, list[dict]], run_id: str | None, all_runs: bool) -> tuple[dict[str, list[dict]], str]:
    """The runs to draw, and a line on those skipped ("" when none)."""
    if all_runs:
        return runs, ""
    if run_id is None:
        run_id = list(runs)[-1]
    elif run_id not in runs:
        raise SystemExit(f"no records of run_id {run_id!r}; the file holds {', '.join(runs)}")
    others = {k: v for k, v in runs.items() if k != run_id}
    if not others:
        return {run_id: runs[run_id]}, ""
    note = (f"drew run {run_id}; skipped {sum(map(len, others.values()))} records of {len(others)} other "
            f"run(s) ({', '.join(others)}): --run_id ID draws another, --all_runs draws each as its own curve")
    return {run_id: runs[run_id]}, note


def series(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of the records that have ``key``."""
    return [(r["step"], r[key]) for r in records if r.get(key) is not None]


def _draw(ax, points: list[tuple[int, float]], **style) -> None:
    if points:
        ax.plot(*zip(*points), **style)


def plot(runs: dict[str, list[dict]], output: Path) -> Path:
    """Each run's curves; with several runs the legend names each run's."""
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(11, 4))
    for run_id, records in runs.items():
        name = f"{run_id}: " if len(runs) > 1 else ""
        colors = {} if len(runs) > 1 else {"val": {"color": "tab:red"}, "tps": {"color": "tab:green"}}
        _draw(ax_loss, series(records, "loss"), marker=".", label=f"{name}training (window mean)")
        _draw(ax_loss, series(records, "val_loss"), marker="o", label=f"{name}validation", **colors.get("val", {}))
        for key in sorted({k for r in records for k in r if k.startswith("val_loss/")}):
            _draw(ax_loss, series(records, key), marker="x", linestyle=":", label=name + key[len("val_loss/"):])
        _draw(ax_tps, series(records, "tps"), marker=".", label=run_id, **colors.get("tps", {}))
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    if len(runs) > 1:
        ax_tps.legend()
    ax_tps.set(xlabel="step", ylabel="tokens / s / device", title="throughput")
    for ax in (ax_loss, ax_tps):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path, help="path to metrics.jsonl")
    parser.add_argument("--output", type=Path, default=None, help="PNG path (default: beside metrics.jsonl)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run_id", default=None, help="draw this run (default: the newest; 'legacy': records "
                       "without a run_id)")
    which.add_argument("--all_runs", action="store_true", help="draw every run in the file, each its own curve")
    args = parser.parse_args(argv)
    runs, note = choose(read_runs(args.metrics), args.run_id, args.all_runs)
    if note:
        print(note)
    out = plot(runs, args.output or args.metrics.with_name("metrics.png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
