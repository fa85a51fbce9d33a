"""Run folders: where every command writes (folder, files, status), how a trained run is
opened (opening), what its metrics.json says (summary), and the table of runs (listing)."""
