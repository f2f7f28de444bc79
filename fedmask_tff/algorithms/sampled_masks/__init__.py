"""Masks trained as probabilities (Bernoulli-sampled forward, Adam, a Beta-Bernoulli server):
FedPM, FedMask's default recipe and its ``local_masks`` ablation.

``config`` (settings), ``client`` (a client's round, plain TF), ``process`` (the TFF pieces),
``algorithm`` (the adapters the runner builds).
"""
