"""toy — the toy world: a procedural scene generator and the tiny models pretrained on it.

The top layer of the project (``vilex`` <- ``vlm`` <- ``benchmarks`` <- ``toy``): stage-0 pretrainers of the tiny
stand-ins for the models that cannot be downloaded here (tokenizer, text encoder, decoder, SigLIP, chat LLM), the
judge (attribute probe, claims), the VLM data and the demo steps. ``toy.scenes`` is a leaf (numpy + PIL only).
"""
