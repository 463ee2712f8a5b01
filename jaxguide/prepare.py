"""`python -m jaxguide.prepare {mnist,minilm}`: see `jaxguide.data.prepare`."""
import sys

from jaxguide.data.prepare import main

if __name__ == "__main__":
  sys.exit(main())
