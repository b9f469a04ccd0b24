"""`distvision tune`: parallel hyperparameter search with Optuna (level 2 of parallelism).

run.py runs the command; study.py owns the Optuna study; trial.py runs one trial as a
`distvision train` subprocess; space.py reads the search space; report.py writes the outputs.
"""
