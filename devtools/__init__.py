"""Small models built locally for tests, benchmarks and the offline quick start (`axion dev`); never imported by
the serving packages."""
