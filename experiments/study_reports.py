"""What a study reports: each run's record, the study's table, figure and raw files (CSV/JSON).

Used by :mod:`experiments.studies` and :mod:`experiments.plot`."""

from __future__ import annotations

import csv
import json
import math
import os

MB = 1e6  # bytes in a megabyte, as reported here (decimal)


def run_record(name: str, swept: dict, results: dict) -> dict:
  """A run's numbers for the study: totals, and one entry per round (``series``)."""
  rows, final, totals, cfg = results["rounds"], results["final"], results["totals"], results["config"]
  init = results.get("initialization") or {}  # --prune_at_init: pruning masks sent before round 1
  cum_bits = float(init.get("uplink_bits_per_client", 0.0))
  cum_flops = float(init.get("train_flops", 0.0)) / max(1, init.get("clients", 1))
  series = []
  last = rows[-1]["round"] if rows else 0
  for r in rows:
    cum_bits += r["uplink_bits_per_client"] + r["downlink_bits_per_client"]
    cum_flops += r["train_flops_per_client"]
    acc = r.get("accuracy")
    acc_mean = r.get("accuracy_client_mean")
    if r["round"] == last:  # the runner's last round is evaluated in "final"
      acc, acc_mean = final["accuracy"], final["accuracy_client_mean"]
    series.append({"round": r["round"], "uplink_bits_per_client": r["uplink_bits_per_client"],
                   "downlink_bits_per_client": r["downlink_bits_per_client"],
                   "cumulative_bits_per_client": cum_bits,
                   "cumulative_mb_per_client": cum_bits / 8 / MB,
                   "train_flops_per_client": r["train_flops_per_client"],
                   "cumulative_train_flops_per_client": cum_flops,
                   "accuracy": acc, "accuracy_client_mean": acc_mean, "wall_s": r["wall_s"]})
  return {
      "run": name, "algorithm": results["algorithm"], "dataset": results["dataset"],
      "clients_per_round": cfg["clients_per_round"], "local_epochs": cfg["local_epochs"],
      **{f"swept_{k}": v for k, v in swept.items()},
      "output_dir": cfg["output_dir"], "model": cfg.get("model_used"),
      "model_parameters": cfg.get("model_parameters"), "learning_rate": cfg.get("learning_rate_used"),
      "accuracy": final["accuracy"], "accuracy_client_mean": final["accuracy_client_mean"],
      "accuracy_after_aggregation": final.get("accuracy_after_aggregation"),
      **client_spread(final),
      "evaluated_clients": final["evaluated_clients"], "rounds": totals["rounds"],
      "uplink_bits_per_client_round": totals["uplink_bits_per_client_round"],
      "downlink_bits_per_client_round": totals["downlink_bits_per_client_round"],
      "cumulative_bits_per_client": cum_bits, "cumulative_mb_per_client": cum_bits / 8 / MB,
      "train_flops_per_client_round": totals["train_flops_per_client_round"],
      "cumulative_train_flops_per_client": cum_flops, "wall_s": totals["wall_s"],
      "series": series,
  }


def client_spread(final: dict) -> dict:
  """The per-client minimum and 10th percentile of a run's final personalized accuracies."""
  import numpy as np
  values = sorted(final.get("accuracy_per_client", {}).values())
  if not values:
    return {"client_min": None, "client_p10": None}
  return {"client_min": values[0], "client_p10": float(np.percentile(values, 10))}


SERIES_COLUMNS = ("run", "algorithm", "clients_per_round", "local_epochs", "round",
                  "uplink_bits_per_client", "downlink_bits_per_client", "cumulative_bits_per_client",
                  "cumulative_mb_per_client", "train_flops_per_client",
                  "cumulative_train_flops_per_client", "accuracy", "accuracy_client_mean", "wall_s")


def write_raw(out: str, payload: dict, csv_rows: list[dict], columns) -> None:
  with open(os.path.join(out, "study.json"), "w") as f:
    json.dump(payload, f, indent=2, default=str)
  with open(os.path.join(out, "study.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in csv_rows:
      writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


def series_rows(records):
  for rec in records:
    for s in rec["series"]:
      yield {"run": rec["run"], "algorithm": rec["algorithm"],
             "clients_per_round": rec["clients_per_round"], "local_epochs": rec["local_epochs"], **s}


def _fmt(value, spec):
  return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _ratio(value, base):
  return value / base if base else None


def training_table(study: str, records: list[dict], header: str) -> str:
  base = {r["algorithm"]: r for r in records}.get("fedavg")
  if study == "fedmask_ablation":
    lines = ["| variant | algorithm | accuracy | client mean | client min | client 10th pct "
             "| before local training "
             "| up bits/client/round | down bits/client/round | cumulative MB/client |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
      lines.append(f"| {r['run']} | {r['algorithm']} | {r['accuracy']:.4f} "
                   f"| {r['accuracy_client_mean']:.4f} | {_fmt(r.get('client_min'), '.3f')} "
                   f"| {_fmt(r.get('client_p10'), '.3f')} "
                   f"| {_fmt(r.get('accuracy_after_aggregation'), '.4f')} "
                   f"| {r['uplink_bits_per_client_round']:,.0f} | {r['downlink_bits_per_client_round']:,.0f} "
                   f"| {r['cumulative_mb_per_client']:.4g} |")
  elif study == "communication":
    lines = ["| algorithm | accuracy | client min | client 10th pct | cumulative MB/client (up+down) "
             "| up bits/client/round "
             "| down bits/client/round | cumulative ÷ FedAvg |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
      lines.append(f"| {r['algorithm']} | {r['accuracy']:.4f} | {_fmt(r.get('client_min'), '.3f')} "
                   f"| {_fmt(r.get('client_p10'), '.3f')} | {r['cumulative_mb_per_client']:.4g} "
                   f"| {r['uplink_bits_per_client_round']:,.0f} | {r['downlink_bits_per_client_round']:,.0f} "
                   f"| {_fmt(_ratio(r['cumulative_bits_per_client'], base and base['cumulative_bits_per_client']), '.4f')} |")
  elif study == "computation":
    lines = ["| algorithm | accuracy | client min | client 10th pct | train FLOPs/client/round "
             "| cumulative train FLOPs/client "
             "| FLOPs ÷ FedAvg |", "|---|---|---|---|---|---|---|"]
    for r in records:
      lines.append(f"| {r['algorithm']} | {r['accuracy']:.4f} | {_fmt(r.get('client_min'), '.3f')} "
                   f"| {_fmt(r.get('client_p10'), '.3f')} | {r['train_flops_per_client_round']:.4g} "
                   f"| {r['cumulative_train_flops_per_client']:.4g} "
                   f"| {_fmt(_ratio(r['train_flops_per_client_round'], base and base['train_flops_per_client_round']), '.3f')} |")
  elif study == "devices":
    lines = ["| algorithm | devices per round | accuracy | client mean | client min | client 10th pct "
             "| evaluated clients "
             "| up bits/client/round | down bits/client/round |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
      lines.append(f"| {r['algorithm']} | {r['clients_per_round']} | {r['accuracy']:.4f} "
                   f"| {r['accuracy_client_mean']:.4f} | {_fmt(r.get('client_min'), '.3f')} "
                   f"| {_fmt(r.get('client_p10'), '.3f')} | {r['evaluated_clients']} "
                   f"| {r['uplink_bits_per_client_round']:,.0f} | {r['downlink_bits_per_client_round']:,.0f} |")
  else:  # epochs
    lines = ["| algorithm | local epochs | accuracy | client min | client 10th pct "
             "| train FLOPs/client/round "
             "| cumulative train FLOPs/client | up bits/client/round | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
      lines.append(f"| {r['algorithm']} | {r['local_epochs']} | {r['accuracy']:.4f} "
                   f"| {_fmt(r.get('client_min'), '.3f')} | {_fmt(r.get('client_p10'), '.3f')} "
                   f"| {r['train_flops_per_client_round']:.4g} | {r['cumulative_train_flops_per_client']:.4g} "
                   f"| {r['uplink_bits_per_client_round']:,.0f} | {r['wall_s']:.1f} |")
  return header + "\n\n" + "\n".join(lines) + "\n"


def pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def training_figure(study: str, records: list[dict], path: str, title: str) -> None:
  plt = pyplot()
  if study == "fedmask_ablation":
    fig, ax = plt.subplots(figsize=(9, 5))
    names = [r["run"] for r in records]
    ax.barh(range(len(names)), [r["accuracy"] for r in records], color="tab:blue")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    lo = min(r["accuracy"] for r in records)
    ax.set_xlim(max(0.0, lo - 0.1), 1.0)
    ax.set_xlabel("personalized accuracy")
  elif study == "communication":
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in records:
      pts = [(s["cumulative_mb_per_client"], s["accuracy"]) for s in r["series"]
             if s["accuracy"] is not None]
      if r["cumulative_bits_per_client"] <= 0:  # nothing sent: not on a log axis
        ax.axhline(r["accuracy"], ls="--", lw=1, color="gray",
                   label=f"{r['algorithm']} (0 bits sent), final")
        continue
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=r["algorithm"])
    ax.set_xscale("log")
    ax.set_xlabel("cumulative communication per client, uplink + downlink (MB, log)")
    ax.set_ylabel("personalized test accuracy")
    ax.legend(fontsize=8)
  elif study == "computation":
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    names = [r["algorithm"] for r in records]
    flops = [r["train_flops_per_client_round"] for r in records]
    a1.bar(names, flops, color="tab:blue")
    positive = [v for v in flops if v > 0]
    log = bool(positive) and max(positive) / min(positive) > 50  # log only for wide ranges
    if log:
      a1.set_yscale("log")
    a1.set_ylabel("training FLOPs per client per round" + (" (log)" if log else ""))
    a2.bar(names, [r["accuracy"] for r in records], color="tab:green")
    a2.set_ylabel("personalized test accuracy")
    a2.set_ylim(0, 1)
    for a in (a1, a2):
      a.tick_params(axis="x", rotation=35)
  elif study == "devices":
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    styles = {}
    values = sorted({r["clients_per_round"] for r in records})
    colors = {v: plt.cm.viridis(i / max(1, len(values) - 1)) for i, v in enumerate(values)}
    for r in records:
      ls = styles.setdefault(r["algorithm"], ["-", "--", ":", "-."][len(styles) % 4])
      pts = [(s["round"], s["accuracy"]) for s in r["series"] if s["accuracy"] is not None]
      a1.plot([p[0] for p in pts], [p[1] for p in pts], ls=ls, marker="o", ms=3,
              color=colors[r["clients_per_round"]], label=f"{r['algorithm']}, {r['clients_per_round']} devices")
    a1.set_xlabel("round")
    a1.set_ylabel("personalized test accuracy")
    a1.legend(fontsize=8)
    for algorithm in styles:
      rs = sorted((r for r in records if r["algorithm"] == algorithm), key=lambda r: r["clients_per_round"])
      a2.plot([r["clients_per_round"] for r in rs], [r["accuracy"] for r in rs], marker="o", label=algorithm)
    a2.set_xlabel("participating devices per round")
    a2.set_ylabel("final personalized test accuracy")
    a2.set_xticks(values)
    a2.legend(fontsize=8)
  else:  # epochs
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for algorithm in dict.fromkeys(r["algorithm"] for r in records):
      rs = sorted((r for r in records if r["algorithm"] == algorithm), key=lambda r: r["local_epochs"])
      x = [r["local_epochs"] for r in rs]
      a1.plot(x, [r["train_flops_per_client_round"] for r in rs], marker="o", label=algorithm)
      a2.plot(x, [r["accuracy"] for r in rs], marker="o", label=algorithm)
    values = sorted({r["local_epochs"] for r in records})
    a1.set_ylabel("training FLOPs per client per round")
    a2.set_ylabel("final personalized test accuracy")
    for a in (a1, a2):
      a.set_xlabel("local epochs")
      a.set_xticks(values)
      a.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


FIGURE_TITLES = {"communication": "Accuracy vs. communication (cf. FedMask Fig. 10)",
                 "computation": "Training computation per client (cf. FedMask Fig. 11)",
                 "devices": "Participating devices per round (cf. FedMask Fig. 12)",
                 "epochs": "Local epochs: training cost and accuracy",
                 "fedmask_ablation": "FedMask's parts, one at a time, beside the simple things"}
