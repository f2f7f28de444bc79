"""Error type raised by the data layer."""


class DataError(ValueError):
  """Raised when a data file or a data-layer argument is invalid.

  Every message says what is wrong and, where a file is involved, names its
  path, so that a user can fix the input without reading the code.
  """
