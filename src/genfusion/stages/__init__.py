"""One module per dvc.yaml stage, named as the stage: a pure core that tests call, and a
`main(params, *, <named paths>)` entry point that the `genfusion` command calls."""
