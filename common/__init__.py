"""The vocabulary the API and the workers share; `VERSION` is the installed package's."""

from importlib import metadata

try:
    VERSION = metadata.version("axion")
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    VERSION = "0+unknown"
