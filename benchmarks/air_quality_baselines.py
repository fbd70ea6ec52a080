"""Air-quality references on the same test windows of every station.

    python benchmarks/air_quality_baselines.py [--data-dir DIR] [--out results.json]

For each of the 12 Beijing stations (``<data-dir>/beijing-air-quality/``, else
``$FEDMQ_DATA_DIR``), forecasting PM2.5 ``--horizon`` hours ahead, prints RMSE and
MAE in µg/m³ on the station's test windows (the fourth year) for:

* persistence: PM2.5 in h hours = PM2.5 now;
* local-only: a model per station trained on its own train part only (its own
  normalisation statistics, early stopping on its own validation part);
* centralised: one model trained on all stations' pooled train parts (the global
  statistics, which ``combine`` computes from the stations' sufficient statistics;
  early stopping on the pooled validation parts).

and, with ``--federated MODEL.npz``, beside them:

* federated: the global model a fedmq run trained (``model.npz``, which ``fedmq demo``
  writes), scored by the ``air-quality`` task on each station's test windows (each
  station normalised with its own statistics, as its device did).

Overall: the mean over stations of their RMSE / MAE, and the pooled RMSE / MAE
over all test windows. Fixed seeds; torch on ``--threads`` threads.

The federated table of docs/benchmarks.md::

    fedmq demo --task air-quality --data-dir ../shared/data --out-dir runs/aq
    python benchmarks/air_quality_baselines.py --data-dir ../shared/data \
        --federated runs/aq/model.npz --out runs/aq/table.json

Defaults: the 5,409-parameter GRU, Adam lr 1e-3 on batches of 512 for every
model (3e-3 gave the same local-only RMSE within 0.5 µg/m³, and a worse
centralised one); early stopping on the validation MSE with patience 2, at most
15 epochs per station (the best epoch was 6 to 11) and 4 centralised epochs
(one centralised epoch is 12 stations' worth of steps; its validation MSE was
lowest after epoch 1 or 2 and rose after: the later years differ from the
training years more than the stations differ from each other). About 1 s per
station epoch and 10 s per centralised epoch on one idle core.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedmq.errors import DataError
from fedmq.tasks.air_quality import (
    Metrics,
    StationSeries,
    build_model,
    combine,
    evaluate,
    fit,
    load_station,
    persistence,
    read_station,
    station_stats,
    stations,
)

METHODS = ("persistence", "local", "central")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("FEDMQ_DATA_DIR"))
    parser.add_argument("--horizon", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam, every model")
    parser.add_argument("--max-epochs", type=int, default=15, help="local-only, per station")
    parser.add_argument("--patience", type=int, default=2, help="local-only, per station")
    parser.add_argument("--central-max-epochs", type=int, default=4)
    parser.add_argument("--central-patience", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stations", type=int, default=0, help="only the first N (0: all)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--federated", type=Path, help="model.npz of a fedmq air-quality run: a column more"
    )
    args = parser.parse_args(argv)
    methods = (*METHODS, "federated") if args.federated else METHODS
    if args.data_dir is None:
        parser.error("pass --data-dir or set FEDMQ_DATA_DIR")
    torch.set_num_threads(args.threads)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    started = time.perf_counter()
    try:
        files = [path for _, path in stations(args.data_dir)]
    except DataError as error:
        sys.exit(str(error))
    if args.stations:
        files = files[: args.stations]
    settings = {
        "horizon": args.horizon,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "local": {"max_epochs": args.max_epochs, "patience": args.patience},
        "central": {"max_epochs": args.central_max_epochs, "patience": args.central_patience},
        "threads": args.threads,
    }
    print(f"$ {command}")
    print(f"settings: {json.dumps(settings)}", flush=True)

    series: list[StationSeries] = [read_station(f) for f in files]
    global_stats = combine(station_stats(s) for s in series)
    results: dict[str, dict[str, Any]] = {s.station: {} for s in series}
    test_metrics: dict[str, dict[str, Metrics]] = {m: {} for m in methods}
    if args.federated:
        test_metrics["federated"] = federated(args.federated, files)

    # Persistence and local-only, one station at a time (its own statistics).
    test_ends = {}
    for s in series:
        data = load_station(s, horizon=args.horizon)
        test_ends[s.station] = data.test.end_time
        test_metrics["persistence"][s.station] = persistence(data.test)
        model = build_model(seed=args.seed)
        fitted = fit(
            model,
            data.train.data,
            data.val.data,
            max_epochs=args.max_epochs,
            patience=args.patience,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        test_metrics["local"][s.station] = evaluate(model, data.test, data.stats)
        results[s.station].update(
            windows={"train": len(data.train), "val": len(data.val), "test": len(data.test)},
            local_fit={
                "epochs": fitted.epochs,
                "best_epoch": fitted.best_epoch,
                "seconds": round(fitted.seconds, 2),
            },
        )
        print(
            f"local {s.station}: {fitted.epochs} epochs (best {fitted.best_epoch}) "
            f"in {fitted.seconds:.1f} s, test RMSE {test_metrics['local'][s.station].rmse:.2f}",
            flush=True,
        )

    # Centralised: every station's windows, normalised with the global statistics.
    train_parts, val_parts, tests = [], [], {}
    for s in series:
        data = load_station(s, horizon=args.horizon, stats=global_stats)
        if not (data.test.end_time == test_ends[s.station]).all():
            sys.exit(f"{s.station}: the test windows differ between normalisations")
        train_parts.append(data.train.data.tensors)
        val_parts.append(data.val.data.tensors)
        tests[s.station] = data.test
    pooled_train = TensorDataset(*(torch.cat(t) for t in zip(*train_parts, strict=True)))
    pooled_val = TensorDataset(*(torch.cat(t) for t in zip(*val_parts, strict=True)))
    del train_parts, val_parts
    model = build_model(seed=args.seed)
    central_fit = fit(
        model,
        pooled_train,
        pooled_val,
        max_epochs=args.central_max_epochs,
        patience=args.central_patience,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    print(
        f"central: {len(pooled_train)} train windows, {central_fit.epochs} epochs "
        f"(best {central_fit.best_epoch}) in {central_fit.seconds:.1f} s",
        flush=True,
    )
    for name, windows in tests.items():
        test_metrics["central"][name] = evaluate(model, windows, global_stats)

    wall = time.perf_counter() - started
    load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    table = markdown(test_metrics, methods)
    print()
    print(table)
    print()
    print(f"wall time {wall:.1f} s; uptime: {load}")

    for method, per in test_metrics.items():
        for name, m in per.items():
            results[name][method] = {"rmse": m.rmse, "mae": m.mae, "n": m.n}
    if args.out:
        report = {
            "command": command,
            "settings": settings,
            "stations": results,
            "overall": overall(test_metrics),
            "central_fit": {
                "epochs": central_fit.epochs,
                "best_epoch": central_fit.best_epoch,
                "seconds": round(central_fit.seconds, 2),
            },
            "wall_seconds": round(wall, 1),
            "uptime": load,
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


def overall(test_metrics: dict[str, dict[str, Metrics]]) -> dict[str, dict[str, float]]:
    """Per method: mean over stations of RMSE and MAE, and pooled RMSE and MAE."""
    out = {}
    for method, per in test_metrics.items():
        values = list(per.values())
        pooled = Metrics.pool(values)
        out[method] = {
            "mean_rmse": sum(m.rmse for m in values) / len(values),
            "mean_mae": sum(m.mae for m in values) / len(values),
            "pooled_rmse": pooled.rmse,
            "pooled_mae": pooled.mae,
        }
    return out


def federated(model_file: Path, files: list[Path]) -> dict[str, Metrics]:
    """The test metrics of a fedmq run's global model at every station, as the task's
    own ``score`` computes them (each station with its own normalisation)."""
    from fedmq.models import set_params
    from fedmq.tasks.air_quality import load_test_data
    from fedmq.tasks.air_quality import task as air_quality

    model = air_quality.build_model()
    with np.load(model_file, allow_pickle=False) as saved:
        set_params(model, {name: saved[name] for name in saved.files})
    out = {}
    for path in files:
        windows = load_test_data(path)
        scores = air_quality.score(model, windows)  # eval mode, no_grad
        n = len(windows)
        out[windows.station] = Metrics(n=n, sum_sq=scores["mse"] * n, sum_abs=scores["mae"] * n)
    return out


def markdown(test_metrics: dict[str, dict[str, Metrics]], methods: tuple[str, ...]) -> str:
    """The table: RMSE / MAE (µg/m³) per station and method, then the overall rows."""
    head = "| station | test windows | " + " | ".join(f"{m} RMSE | {m} MAE" for m in methods) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(methods))]
    for name in test_metrics["persistence"]:
        cells = [name, str(test_metrics["persistence"][name].n)]
        for method in methods:
            m = test_metrics[method][name]
            cells += [f"{m.rmse:.2f}", f"{m.mae:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    summary = overall(test_metrics)
    n = Metrics.pool(test_metrics["persistence"].values()).n
    for label, rmse, mae in (
        ("**mean over stations**", "mean_rmse", "mean_mae"),
        ("**pooled**", "pooled_rmse", "pooled_mae"),
    ):
        cells = [label, str(n)]
        for method in methods:
            cells += [f"{summary[method][rmse]:.2f}", f"{summary[method][mae]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
