"""MLflow tracking of a study: one parent run per study, one child run per trial.

Contract used by sweep.objective / sweep.run (implementation to come):

    tracker = Tracker(tracking_uri, experiment_name)   # None uri -> MLFLOW_TRACKING_URI or ./mlruns
    tracker.check_reachable()                          # raises TrackingUnavailable naming the URI
    parent_id = tracker.ensure_parent_run(study)       # get-or-create, id in study.user_attrs
    run = tracker.start_trial(trial, config, data_config, seed=seed)  # child run "trial-<n>"
    run.log_epoch(metrics)                             # EpochMetrics; non-blocking, batched
    run.end(state, history=..., reason=None, pruned_epoch=None)   # state: completed|pruned|failed
    tracker.finish_study(study, out_dir)               # parent-run summary, table, Optuna plots
    undelivered = tracker.close()                      # flush; number of metric points not delivered
"""

from __future__ import annotations


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached; the message names the URI."""
