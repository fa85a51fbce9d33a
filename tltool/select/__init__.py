"""`tltool select`: choose how to build the target model by cross-validating candidate
routes on the target's labelled rows.

- `workflow`: the command's flow (the test split is read only after the choice);
- `candidates`: the default grid of routes, the source models it needs, each candidate's
  config and complexity;
- `crossval`: every candidate trained on the folds (network folds in lockstep) and its
  out-of-fold predictions;
- `scoring`: folds, fold scores; `rules`: the choice among scored candidates;
- `leaderboard`: the table of candidates and the average of the best;
- `refit`: the choice refit on every labelled row and scored on test once (`research`: every
  candidate, for study only);
- `unsupervised` and `criteria`: the choice without target labels (domain adaptation).
"""
