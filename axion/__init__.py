"""The composition root: the `axion` command, which puts the API, the workers and the Batch API together."""
