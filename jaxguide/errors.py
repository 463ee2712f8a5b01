"""One exception for bad input: the scripts print its message as one line and exit with code 2."""


class ConfigError(ValueError):
  """Bad user input. The message is one line that names the field and the fix."""
