"""`genfusion` commands that are not pipeline stages: people's labels in Label Studio,
experiments and sweeps, the FiftyOne App."""
