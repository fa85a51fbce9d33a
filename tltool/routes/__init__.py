"""Routes: the ways of building the target model from a config (which weights and prior,
which rows, which head), shared by pretrain / freeze-finetune and by `tltool select`.

- `route`: `Route` and `prepare` (load and check everything before a run folder exists);
- `checks`: what a route may combine, and the task it learns;
- `others`: the rows and models besides the training set (prior, pooled source rows, the other
  domain of an adaptation);
- `training`: build a route's network and train it (gradient steps, or a fitted classic head).
"""
