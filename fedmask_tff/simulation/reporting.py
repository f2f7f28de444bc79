"""What a run reports: the round rows, the totals, the summary it prints, TensorBoard scalars
and the progress bar. Plain Python and numpy (TensorFlow only for TensorBoard)."""

from __future__ import annotations

import math
import sys

import numpy as np


def summarize(per_client: dict) -> dict:
  """Accuracy and loss over clients from ``{client: (correct, examples, loss_sum)}``."""
  correct = sum(v[0] for v in per_client.values())
  examples = sum(v[1] for v in per_client.values())
  accs = {c: v[0] / v[1] for c, v in per_client.items() if v[1] > 0}
  return {"accuracy": correct / examples if examples else float("nan"),
          "accuracy_client_mean": float(np.mean(list(accs.values()))) if accs else float("nan"),
          "loss": sum(v[2] for v in per_client.values()) / examples if examples else float("nan"),
          "accuracy_per_client": accs, "evaluated_clients": len(accs),
          "test_examples": int(examples)}


def round_row(round_num: int, sampled: list, dropped: set, train: list, num_params: int) -> dict:
  """A round's row of ``results.json`` from its clients' metrics (bits from the payloads)."""
  examples = sum(m["examples"] for m in train)
  loss = sum(m["loss_sum"] for m in train) / examples if examples else float("nan")
  up = [int(m["uplink_bits"]) for m in train]
  down = [int(m["downlink_bits"]) for m in train]
  flops = [float(m["train_flops"]) for m in train]
  return {"round": round_num, "train_loss": loss,
          "uplink_bits": sum(up), "downlink_bits": sum(down),
          "uplink_bits_per_client": sum(up) / len(up), "downlink_bits_per_client": sum(down) / len(down),
          "train_flops": sum(flops), "train_flops_per_client": sum(flops) / len(flops),
          "clients": len(sampled), "examples": examples, "wall_s": 0.0, "worker_restarted": False,
          "sampled_clients": sampled, "dropped_clients": sorted(dropped),
          "rejected_uploads": int(sum(1 - m.get("upload_valid", 1) for m in train)),
          "diverged_clients": int(sum(m.get("diverged", 0) for m in train)),
          "uplink_bits_by_client": dict(zip(sampled, up)),
          "uplink_bits_per_param": sum(up) / len(up) / num_params,
          "downlink_bits_per_param": sum(down) / len(down) / num_params,
          "downlink_bits_by_client": dict(zip(sampled, down))}


def run_totals(totals: dict, rounds: list, wall_s: float, num_params: int) -> dict:
  """``results.json["totals"]``: the run's bits and FLOPs (``totals``) and per-round means."""
  def mean(key):
    return float(np.mean([r[key] for r in rounds]))
  return {
      "uplink_bits": totals["uplink_bits"], "downlink_bits": totals["downlink_bits"],
      "train_flops": totals["train_flops"],
      "rounds": len(rounds), "wall_s": wall_s,
      "train_wall_s": float(sum(r["wall_s"] for r in rounds)),
      "uplink_bits_per_client_round": mean("uplink_bits_per_client"),
      "downlink_bits_per_client_round": mean("downlink_bits_per_client"),
      "train_flops_per_client_round": mean("train_flops_per_client"),
      "uplink_bits_per_param": mean("uplink_bits_per_client") / num_params,
      "downlink_bits_per_param": mean("downlink_bits_per_client") / num_params,
      "dense_fedavg_bits_per_client_round_each_way": 32 * num_params,
  }


TENSORBOARD_SCALARS = ("train_loss", "accuracy", "uplink_bits_per_client", "downlink_bits_per_client",
                      "train_flops_per_client", "final_accuracy")


def tensorboard_scalars(writer, step: int, row: dict) -> None:
  """Per-round scalars under ``<output_dir>/tensorboard`` (``tensorboard --logdir``)."""
  import tensorflow as tf
  with writer.as_default(step=step):
    for key in TENSORBOARD_SCALARS:
      value = row.get(key)
      if isinstance(value, (int, float)) and math.isfinite(value):
        tf.summary.scalar(key, float(value))
  writer.flush()


def _partition_words(cfg) -> str:
  if cfg.get("partition_file"):
    return f"partition {cfg['partition_file']}"
  if cfg["dataset"] == "fashion_mnist":
    return cfg["partition"]
  if cfg["dataset"] == "cifar10":
    return f"{cfg['classes_per_client']} classes per client"
  return "one client per writer/subject/role"


def print_summary(results, num_params: int):
  """The run's summary on stdout; dense FedAvg sends 32 bits per parameter each way."""
  dense_bits = 32 * num_params
  final, totals, cfg = results["final"], results["totals"], results["config"]
  up, down = totals["uplink_bits_per_client_round"], totals["downlink_bits_per_client_round"]
  q = np.percentile(list(final["accuracy_per_client"].values()) or [float("nan")], [0, 10, 50, 100])
  mode = f", mask_mode={cfg['mask_mode_used']}" if "mask_mode_used" in cfg else ""
  lines = [
      "",
      f"{results['algorithm']} on {results['dataset']} ({_partition_words(cfg)}, "
      f"{cfg['data']['num_clients']} clients, {totals['rounds']} rounds{mode})",
      f"  personalized {final.get('evaluated_on', 'test')} accuracy: {final['accuracy']:.4f} "
      f"(example-weighted over {final['evaluated_clients']} clients, {final['test_examples']} "
      f"{final.get('evaluated_on', 'test')} examples); "
      f"client mean {final['accuracy_client_mean']:.4f}",
      f"  per-client accuracy: min {q[0]:.3f}, 10th percentile {q[1]:.3f}, median {q[2]:.3f}, max {q[3]:.3f}",
  ]
  if "accuracy_after_aggregation" in final:
    lines.append(f"  the same clients with the mask received after the last aggregation (before local "
                 f"training): {final['accuracy_after_aggregation']:.4f}")
  lines += [
      "  bits per client per round, measured from the payloads:",
      f"    uplink   {up:>14,.0f}  ({up / num_params:.3f} bits/parameter)   "
      f"dense FedAvg would send {dense_bits:,} (32 bits x {num_params:,} float32 weights)",
      f"    downlink {down:>14,.0f}  ({down / num_params:.3f} bits/parameter)   "
      f"dense FedAvg would send {dense_bits:,}",
  ]
  if up > 0:
    lines.append(f"    uplink saving vs dense FedAvg: {dense_bits / up:.1f}x")
  lines += [
      f"  training FLOPs per client per round: {totals['train_flops_per_client_round']:.4g}",
      f"  wall time {totals['wall_s']:.1f} s (training rounds {totals['train_wall_s']:.1f} s)",
      f"  results: {cfg['output_dir']}/results.json, metrics.csv, partition.json",
  ]
  print("\n".join(lines), flush=True)


class Progress:
  """A tqdm bar over rounds with the latest metrics (plain lines when tqdm is off)."""

  def __init__(self, total, enabled=True, initial=0):
    self._bar = None
    if enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc="rounds", unit="round", file=sys.stderr,
                       dynamic_ncols=True, mininterval=0.5)

  def update(self, round_num, row):
    info = {"loss": f"{row['train_loss']:.3f}", "up/client": f"{row['uplink_bits_per_client']:.3g}b",
            "s": f"{row['wall_s']:.1f}"}
    if "accuracy" in row:
      info["acc"] = f"{row['accuracy']:.3f}"
    if self._bar is not None:
      self._bar.set_postfix(info, refresh=False)
      self._bar.update(1)

  def close(self):
    if self._bar is not None:
      self._bar.close()
