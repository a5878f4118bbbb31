"""Training in torch around the export: the tiny nanoGPT-format trainer (:mod:`.train`) and its
corpus (:mod:`.corpus`), and pruning the decoder (:mod:`.prune`) with a recovery fine-tune
(:mod:`.finetune`) for ``gptedge export --prune``. Import the modules themselves (they need torch)."""
