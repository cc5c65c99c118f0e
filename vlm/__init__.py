"""vlm — stage 2: the LLaVA-style VLM (vision tower -> projector -> HF causal LM), its data, training and HF export.

Read in this order: config.py (what a YAML holds) -> towers.py (siglip | vilex | vilex_tokens) -> projector.py ->
model.py (the VLM, stage map, checkpoint components) -> templates.py + data.py (LLaVA JSON -> verified tokens/labels)
-> packing.py + sampler.py (micro-batches) -> train.py (`vilex train-vlm`) -> export.py (`vilex export-hf`).
tiny.py builds tiny stand-ins of every part for tests and benchmarks; cli.py registers the commands. See README.md.
Nothing heavy is imported here, so `vilex --help` stays instant.
"""
