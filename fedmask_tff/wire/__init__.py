"""What crosses the network, and how it is stored: ``bitpack`` (1 bit per mask element; plain
TF), ``coding`` (entropy coding of masks), ``quantization`` (b-bit downlinks), ``ldp``
(randomized response), ``payloads`` (bits of TFF values, upload validity) and ``client_state``
(a client's state on disk).
"""
