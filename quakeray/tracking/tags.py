"""The MLflow tags quakeray sets: one name per tag, for the code that writes and reads them.

Filter on them in the MLflow UI, e.g. ``tags."quakeray.status" = 'completed'``.
"""

from __future__ import annotations

__all__ = [
    "BACKBONE",
    "BEST",
    "BEST_CHECKPOINT",
    "BEST_EPOCH",
    "BEST_RUN_ID",
    "BEST_TRIAL_ID",
    "CONFIRM",
    "CONTINUES",
    "ERROR",
    "REFERENCE",
    "REGISTERED_MODEL",
    "RESTARTS",
    "RESUMED_FROM",
    "ROLE",
    "RUN_DIR",
    "SEARCH",
    "SEARCH_DIR",
    "SEED",
    "STATUS",
    "TRIAL_ID",
    "VERDICT",
]

# Every run that trained a model (a `quakeray train` run, a search trial).
BEST_CHECKPOINT = (
    "quakeray.best_checkpoint"  # best checkpoint folder or URI (of a search: its best)
)
BEST_EPOCH = "quakeray.best_epoch"  # epoch (0-based) of that checkpoint

# Runs of `quakeray train`.
RUN_DIR = "quakeray.run_dir"  # the Train run's storage folder
BACKBONE = "quakeray.backbone"  # model.backbone
RESUMED_FROM = "quakeray.resumed_from"  # the checkpoint folder given to --resume

# Runs of a search: the parent (role "search") and one child per trial (role "trial").
ROLE = "quakeray.role"  # "search" | "trial" | "confirm" (a seed confirmation run)
SEARCH = "quakeray.search"  # search name
SEARCH_DIR = "quakeray.search_dir"  # folder to pass to --resume
TRIAL_ID = "quakeray.trial_id"  # Tune trial id
STATUS = "quakeray.status"  # running | completed | stopped | failed | cancelled
REFERENCE = "quakeray.reference"  # mse_only | paper (reference points only)
ERROR = "quakeray.error"  # first line of a failed trial's error
RESTARTS = "quakeray.restarts"  # times Tune restarted the trial
CONTINUES = "quakeray.continues"  # the unsaved trial (killed driver) this trial continued
BEST_TRIAL_ID = "quakeray.best_trial_id"  # on the parent: the best trial
BEST_RUN_ID = "quakeray.best_run_id"  # on the parent: the best trial's run
BEST = "quakeray.best"  # on trials: "true" on the search's best (its name marked too)
REGISTERED_MODEL = "quakeray.registered_model"  # on the parent: models:/<search>@champion
CONFIRM = "quakeray.confirm"  # confirmation runs: mse_only | paper | best
SEED = "quakeray.seed"  # confirmation runs: their optim.seed
VERDICT = "quakeray.verdict"  # on the parent: the seed-confirmed verdict, one sentence
