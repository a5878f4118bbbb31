"""gptedge.quantize: bundle → smaller bundle (fp16, int8, int4, pruning), with a quality gate."""
