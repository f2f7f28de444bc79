"""Reader for the IDX file format used by MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number followed by the dimensions and the data:

* bytes 0-1: zero;
* byte 2: element type code (see `IDX_DTYPES`);
* byte 3: number of dimensions `ndim` (>= 1);
* `ndim` big-endian uint32 sizes, one per dimension;
* the elements, big-endian, in C (row-major) order.

Files may be stored raw or gzip-compressed.
"""

import gzip
import os
import zlib

import numpy as np

from fedmask_tff.data.errors import DataError

# Element type code -> big-endian numpy dtype.
IDX_DTYPES = {
    0x08: np.dtype('>u1'),
    0x09: np.dtype('>i1'),
    0x0B: np.dtype('>i2'),
    0x0C: np.dtype('>i4'),
    0x0D: np.dtype('>f4'),
    0x0E: np.dtype('>f8'),
}

_GZIP_MAGIC = b'\x1f\x8b'


def _read_bytes(path: str) -> bytes:
  """Returns the (decompressed) content of `path`.

  The file is gunzipped when its name ends in `.gz` or when it starts with the
  gzip magic bytes (a valid raw IDX file always starts with two zero bytes).
  """
  if not os.path.isfile(path):
    raise DataError(f'IDX file {path}: does not exist or is not a file')
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f'IDX file {path}: cannot be read ({e})') from e
  if path.endswith('.gz') or raw.startswith(_GZIP_MAGIC):
    try:
      return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(
          f'IDX file {path}: corrupt or truncated gzip data ({e})'
      ) from e
  return raw


def read_idx(path) -> np.ndarray:
  """Reads an IDX file (raw or gzip-compressed) into a numpy array.

  Args:
    path: path (str or os.PathLike) of the file; gzip is detected from a `.gz`
      suffix or from the gzip magic bytes.

  Returns:
    A writable array with the file's shape (`ndim` dims as in the header) and
    element type in native byte order: uint8, int8, int16, int32, float32 or
    float64 for type codes 0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E.

  Raises:
    DataError: naming `path`, if the file is missing, unreadable, not valid
      gzip, has a bad magic number (non-zero leading bytes, unknown type code,
      zero dimensions), or its payload is shorter or longer than the product of
      its dimensions.
  """
  path = os.fspath(path)
  data = _read_bytes(path)
  if len(data) < 4:
    raise DataError(
        f'IDX file {path}: too short for the 4-byte magic number '
        f'({len(data)} bytes)'
    )
  if data[0] != 0 or data[1] != 0:
    raise DataError(
        f'IDX file {path}: bad magic number 0x{data[:4].hex()} (the first two '
        'bytes must be zero); not an IDX file'
    )
  type_code, ndim = data[2], data[3]
  if type_code not in IDX_DTYPES:
    known = ', '.join(f'0x{c:02X}' for c in IDX_DTYPES)
    raise DataError(
        f'IDX file {path}: unknown element type code 0x{type_code:02X} '
        f'(known: {known})'
    )
  if ndim < 1:
    raise DataError(f'IDX file {path}: header declares 0 dimensions')
  header_len = 4 + 4 * ndim
  if len(data) < header_len:
    raise DataError(
        f'IDX file {path}: truncated header ({len(data)} bytes, {ndim} '
        f'dimensions need {header_len})'
    )
  dims = tuple(
      int(d) for d in np.frombuffer(data, dtype='>u4', count=ndim, offset=4)
  )
  dtype = IDX_DTYPES[type_code]
  expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  actual = len(data) - header_len
  if actual != expected:
    what = 'truncated' if actual < expected else 'too long'
    raise DataError(
        f'IDX file {path}: {what} payload: dimensions {dims} of '
        f'{dtype.itemsize}-byte elements need {expected} bytes after the '
        f'header, found {actual}'
    )
  array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
  return array.astype(dtype.newbyteorder('='))
