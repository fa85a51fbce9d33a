"""The training engine: one loop for every route that trains by gradient steps.

- `plan`: what to train and how (rounds, the rows, where results go);
- `batches`: what one step computes, per kind of batch (plain, pooled with source rows,
  adapted with unlabelled target rows);
- `loop`: one model's training state and its epoch (`Trainer`);
- `drive`: `fit` — rounds of epochs with early stopping, checkpoints and metrics.csv;
- `state`: what a resumed run continues from (`TrainState`), what training did
  (`TrainingReport`), and `EarlyStopping` (also used by select's cross-validation);
- `predict`: inference (logits, probabilities).
"""
