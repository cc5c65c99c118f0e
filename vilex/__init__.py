"""ViLex suite — Visual Lexicon (arXiv 2412.06774): image tokens in a frozen T2I model's word-embedding space.

Stage 1 (this package): ViLex encoder, frozen decoders, pipeline, pretraining. Stage 2 lives in
``vlm``, evaluation in ``benchmarks``. Shared spine: ``vilex.config``, ``vilex.registry``,
``vilex.checkpoint``, ``vilex.data``, ``vilex.cli``.
"""
__version__ = "0.1.0"
