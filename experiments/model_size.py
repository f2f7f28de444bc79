"""The ``model_size`` study (cf. FedMask Table 5): each model's parameters, float32 and 1-bit
mask sizes, and what one-shot pruning removes; no training.
``python -m experiments.studies --study=model_size`` runs it."""

from __future__ import annotations

import math
import os

from experiments.study_reports import MB, pyplot, write_raw


# (label, model name, input shape, classes, input dtype note)
SIZE_MODELS = (
    ("vgg16 (CIFAR-10)", "vgg16", (32, 32, 3), 10),
    ("vgg16_paper (CIFAR-10)", "vgg16_paper", (32, 32, 3), 10),
    ("vgg16_paper (64 classes)", "vgg16_paper", (32, 32, 3), 64),
    ("har_mlp (HAR)", "har_mlp", (128, 9), 6),
    ("har_mlp (HAR features)", "har_mlp", (561,), 6),
    ("shakespeare_lstm (Shakespeare)", "shakespeare_lstm", (80,), 90),
    ("cnn (Fashion-MNIST)", "cnn", (28, 28, 1), 10),
    ("cnn (FEMNIST)", "cnn", (28, 28, 1), 62),
)
SIZE_COLUMNS = ("model", "architecture", "input_shape", "classes", "width", "parameters",
                "float32_mb", "mask_parameters", "mask_mb", "compression", "pruned_layers",
                "prune_rate", "pruned_layer_parameters", "removed_parameters",
                "pruned_float32_mb", "pruned_mask_mb", "pruning_mask_mb_once",
                "uplink_mb_per_round_as_implemented", "downlink_mb_per_round_as_implemented")


def size_row(label: str, name: str, input_shape, classes: int, width: float, prune_rate: float) -> dict:
  """One model's Table-5 sizes (builds the masked model; no training)."""
  import tensorflow as tf
  from fedmask_tff import models
  from fedmask_tff.models import paper
  from fedmask_tff.masks.layers import masked_layers
  from fedmask_tff.masks.pruning import kept_count
  tf.keras.backend.clear_session()
  model = models.masked_builder(name)(input_shape, classes, width=width, seed=0)
  report = paper.model_size_report(model)
  prune_last = models.prune_last_layers(name)  # what the runner uses
  layers = masked_layers(model)
  first_pruned = len(layers) - prune_last
  pruned_n, removed, pruned_mask_bytes, once_bytes, pruned_names = 0, 0, 0, 0, []
  for i, layer in enumerate(layers):
    for _, kernel, _, _ in layer.masked_weights:
      n = int(kernel.shape.num_elements())
      if i >= first_pruned:
        k = kept_count(n, prune_rate)
        pruned_n += n
        removed += n - k
        pruned_mask_bytes += (k + 7) // 8
        once_bytes += (n + 7) // 8
      else:
        pruned_mask_bytes += (n + 7) // 8
    if i >= first_pruned:
      pruned_names.append(layer.name)
  kept_masked = report["mask_parameters"] - removed
  row = {
      "model": label, "architecture": name, "input_shape": list(input_shape), "classes": classes,
      "width": width, "parameters": report["parameters"],
      "float32_mb": report["float32_bytes"] / MB, "mask_parameters": report["mask_parameters"],
      "mask_mb": report["mask_bytes"] / MB, "compression": report["compression"],
      "pruned_layers": ",".join(pruned_names), "prune_rate": prune_rate,
      "pruned_layer_parameters": pruned_n, "removed_parameters": removed,
      "pruned_float32_mb": 4 * (report["parameters"] - removed) / MB,
      "pruned_mask_mb": pruned_mask_bytes / MB, "pruning_mask_mb_once": once_bytes / MB,
      "uplink_mb_per_round_as_implemented": report["mask_bytes"] / MB,
      "downlink_mb_per_round_as_implemented": 4 * kept_masked / MB,
      "other_parameters": report["other_parameters"],
  }
  del model
  return row


SIZE_NOTES = """How the sizes are counted (MB = 10^6 bytes):

- **parameters**: the network's weights as a dense model has them (`paper.model_size_report`:
  the frozen W, frozen biases and embedding; not the mask scores, which are training state);
  **float32 MB** = 4 bytes each.
- **1-bit mask MB**: one bit per masked element (every Dense/Conv2D/LSTM kernel), packed per tensor
  (`ceil(n / 8)` bytes): what a FedMask client uploads per round before pruning.
- **pruned**: one-shot pruning keeps `max(1, round(p_r * n))` elements of each weight tensor of the
  last `L` masked layers (`L` = 8 for VGG-16, 2 otherwise; the runner's setting), p_r = {p};
  **removed** = the elements it drops for good.
- **pruned float32 MB** = 4 bytes × (parameters − removed): the values of the pruned model; their
  positions are the pruning mask (next but one column), not counted here.
- **pruned 1-bit mask MB**: one bit per element that is still kept (the pruned layers' kept
  elements only): pruned positions cost nothing to send after a client's first round, because
  the server holds each client's pruning mask from that first upload.
- **pruning mask MB (once)**: that first upload, one bit per element of the pruned layers.
- **as implemented**: what `fedmask_tff` measures in a run today: uplink = the full packed masks
  every round (pruned positions are still sent, as zero bits; plus the pruning masks in a client's
  first round); downlink = one float32 per kept element (32 × kept bits).

The paper's Table 5 is below, quoted from the paper (Li et al., SenSys 2021, camera-ready PDF).
Its "Baseline" sizes are 4 bytes per float32 parameter of larger networks than ours: the
ImageNet-style VGG-16 classifier (25088-4096-4096-classes, i.e. 224×224 inputs) rather than the
CIFAR one we build (512-512-classes), and a HAR MLP on the 561 UCI-HAR features. The column
"parameters that give it" is computed here, not quoted; it reproduces the paper's Baseline MB to
the printed digits. The paper's FedMask column is not explained by pruning alone (keeping 20 % of
the last 8 VGG-16 layers would leave 116.8 MB, not 365.30), and its text does not say how it was
counted, so compare ratios with care.
"""

# The paper's Table 5 (MB): FedMask, Baseline, BNN-FedAvg, quoted from the paper's PDF.
PAPER_TABLE5 = (("IC-CIFAR10", 365.30, 537.21, 16.78), ("IC-EMNIST", 364.72, 538.09, 16.82),
                ("HAR", 2.69, 4.41, 0.14), ("NCP", 0.92, 1.53, 0.05))


def _dense_parameters(sizes) -> int:
  """Weights and biases of a chain of dense layers ``sizes[0] -> sizes[1] -> ...``."""
  return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def _vgg16_imagenet_parameters(classes: int) -> int:
  """VGG-16 (configuration D) with biases and the ImageNet classifier 25088-4096-4096-classes."""
  from fedmask_tff.models import paper
  convs, channels = 0, 3
  for c in paper.VGG16_FEATURES:
    if c != "M":
      convs += 9 * channels * c + c
      channels = c
  return convs + _dense_parameters((7 * 7 * 512, 4096, 4096, classes))


def paper_table5_rows() -> list[dict]:
  explained = {"IC-CIFAR10": ("VGG-16, ImageNet classifier, 10 classes", _vgg16_imagenet_parameters(10)),
               "IC-EMNIST": ("VGG-16, ImageNet classifier, 64 classes", _vgg16_imagenet_parameters(64)),
               "HAR": ("MLP 561-1024-512-6", _dense_parameters((561, 1024, 512, 6)))}
  rows = []
  for task, fedmask, baseline, bnn in PAPER_TABLE5:
    label, params = explained.get(task, ("not inferred", None))
    rows.append({"task": task, "fedmask_mb": fedmask, "baseline_mb": baseline, "bnn_fedavg_mb": bnn,
                 "fedmask_over_baseline": fedmask / baseline, "baseline_over_bnn": baseline / bnn,
                 "baseline_network": label, "baseline_network_parameters": params,
                 "baseline_network_float32_mb": None if params is None else 4 * params / MB})
  return rows


# Table 5's tasks and the rows of SIZE_MODELS that build the paper's network for them.
OURS_FOR_TASK = {"IC-CIFAR10": "vgg16_paper (CIFAR-10)", "IC-EMNIST": "vgg16_paper (64 classes)",
                 "HAR": "har_mlp (HAR features)", "NCP": "shakespeare_lstm (Shakespeare)"}


def beside_ours_markdown(rows: list[dict]) -> str:
  """The paper's Table 5 next to the models built here (their float32, 1-bit and pruned sizes)."""
  ours = {r["model"]: r for r in rows}
  lines = ["**Table 5 beside ours** (MB; ours measured from the built models at this width):", "",
           "| task | our model | paper Baseline | our float32 | paper BNN-FedAvg | our 1-bit mask "
           "| paper FedMask | our pruned float32 | our parameters |", "|---|---|---|---|---|---|---|---|---|"]
  for task, fedmask, baseline, bnn in PAPER_TABLE5:
    r = ours.get(OURS_FOR_TASK[task])
    if r is None:
      continue
    lines.append(f"| {task} | {r['model']}, {'×'.join(map(str, r['input_shape']))} | {baseline:.2f} "
                 f"| {r['float32_mb']:.2f} | {bnn:.2f} | {r['mask_mb']:.2f} | {fedmask:.2f} "
                 f"| {r['pruned_float32_mb']:.2f} | {r['parameters']:,} |")
  return "\n".join(lines)


def paper_table5_markdown() -> str:
  lines = ["**The paper's Table 5** (MB, quoted) and the float32 parameters that give its Baseline "
           "column (computed here):", "",
           "| task | FedMask | Baseline | BNN-FedAvg | FedMask ÷ Baseline | Baseline ÷ BNN "
           "| parameters that give it | their float32 MB |", "|---|---|---|---|---|---|---|---|"]
  for r in paper_table5_rows():
    params = r["baseline_network_parameters"]
    lines.append(f"| {r['task']} | {r['fedmask_mb']:.2f} | {r['baseline_mb']:.2f} "
                 f"| {r['bnn_fedavg_mb']:.2f} | {r['fedmask_over_baseline']:.3f} "
                 f"| {r['baseline_over_bnn']:.1f} | {r['baseline_network']}"
                 + (f" ({params:,})" if params else "") + " | "
                 + (f"{r['baseline_network_float32_mb']:.2f}" if params else "–") + " |")
  return "\n".join(lines)


def model_size_study(preset: str, out: str, width: float, prune_rate: float, log) -> str:
  """Builds every model of :data:`SIZE_MODELS` and writes ``out``/table.md, figure.png and the
  raw study files; returns the table. Sizes in MB of 10^6 bytes."""
  from fedmask_tff.simulation.run_config import ConfigError
  if not (math.isfinite(width) and width > 0):
    raise ConfigError(f"--model_width must be > 0, got {width}")
  from fedmask_tff.masks.pruning import check_prune_rate
  try:
    check_prune_rate(prune_rate)
  except ValueError as e:
    raise ConfigError(f"--{e}") from None
  os.makedirs(out, exist_ok=True)
  rows = []
  for i, (label, name, shape, classes) in enumerate(SIZE_MODELS, start=1):
    log(f"model {i}/{len(SIZE_MODELS)} {label}: building at width {width:g} ...")
    rows.append(size_row(label, name, shape, classes, width, prune_rate))
  lines = [f"**model_size** study (cf. FedMask Table 5): masked models at width {width:g}, "
           f"p_r = {prune_rate:g}; no training.", "",
           "| model | input | parameters | float32 MB | 1-bit mask MB | float32 ÷ mask | pruned layers "
           "| removed | pruned float32 MB | pruned 1-bit mask MB | pruning mask MB (once) "
           "| downlink MB/round as implemented |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {'×'.join(map(str, r['input_shape']))} / {r['classes']} "
                 f"| {r['parameters']:,} | {r['float32_mb']:.4g} | {r['mask_mb']:.4g} "
                 f"| {r['compression']:.1f} | {r['pruned_layers']} | {r['removed_parameters']:,} "
                 f"| {r['pruned_float32_mb']:.4g} | {r['pruned_mask_mb']:.4g} "
                 f"| {r['pruning_mask_mb_once']:.4g} | {r['downlink_mb_per_round_as_implemented']:.4g} |")
  text = ("\n".join(lines) + "\n\n" + SIZE_NOTES.replace("{p}", f"{prune_rate:g}") + "\n"
          + paper_table5_markdown() + "\n\n" + beside_ours_markdown(rows) + "\n")
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(text)
  write_raw(out, {"study": "model_size", "preset": preset, "width": width, "prune_rate": prune_rate,
                  "mb_bytes": MB, "paper_table5": paper_table5_rows(), "models": rows},
            rows, SIZE_COLUMNS)
  plt = pyplot()
  import numpy as np
  fig, ax = plt.subplots(figsize=(10, 4.8))
  keys = (("float32_mb", "float32"), ("pruned_float32_mb", f"float32, pruned (p_r={prune_rate:g})"),
          ("mask_mb", "1-bit mask"), ("pruned_mask_mb", "1-bit mask, pruned (kept positions)"))
  x = np.arange(len(rows))
  for j, (key, label) in enumerate(keys):
    ax.bar(x + (j - 1.5) * 0.2, [r[key] for r in rows], 0.2, label=label)
  ax.set_xticks(x)
  ax.set_xticklabels([r["model"] for r in rows], fontsize=8)
  ax.set_yscale("log")
  ax.set_ylabel("MB (10^6 bytes, log)")
  ax.set_title(f"Model size (cf. FedMask Table 5), width {width:g}", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "figure.png"), dpi=110)
  plt.close(fig)
  return text
