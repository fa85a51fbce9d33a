"""The commands that use or make trained runs, one module each: train (pretrain,
freeze-finetune), evaluate, predict, ensemble, extract, export, resume; with the outputs of a
trained route (outputs) and the averaging of models (averaging). `tltool select` is its own
package (tltool.select)."""
