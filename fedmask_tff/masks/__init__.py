"""Mask maths and masked Keras layers: plain Keras (2 or 3), no TFF.

``masking`` (binary/STE/soft masks, the vote rules' maths), ``vote_rules`` (their names),
``layers`` and ``lstm`` (masked Dense/Conv2D/LSTM, ``pack_masks``), ``pruning`` (one-shot
pruning, ``prune_model``), ``aggregation`` (FedMask's rule over the devices that keep an
element), ``regularizers`` (the paper's group-lasso penalty).
"""
