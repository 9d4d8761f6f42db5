"""MLflow behind a thin wrapper: one run per stage execution, and a null tracker for tests.

Conventions (DESIGN.md): tracking URI from `MLFLOW_TRACKING_URI`, else `tracking.uri` (a relative
sqlite path is taken from the repo root, `DVC_ROOT` inside `dvc exp run`); run named after the
stage in `tracking.experiment`; params flattened; tags `lmpipe.stage`, `git.commit`,
`git.dirty`, `input.<name>.sha256`, `lmpipe.output.<sha256>` on the run that wrote an output
with that content, `lineage.<name>.run_id` (the last finished run that wrote an input's content:
lineage by content, as DVC tracks it, so it needs no run id inside the hashed outputs) and
`dvc.exp_name` inside a DVC experiment.

Modules, each importing only those above it:
- `report`: a report's numeric leaves as metrics, a registered version's description.
- `tracker`: what a stage logs through (`NullTracker`, `MlflowTracker`, `RenamingTracker`).
- `store`: where the store is (the tracking URI, artifact locations, relocating a copied store)
  and whether a server answers.
- `run`: `stage_run`, the MLflow run of one stage execution: its tags, the runs that wrote its
  inputs, and the pipeline run it nests under.
"""
