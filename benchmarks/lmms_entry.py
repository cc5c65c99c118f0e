"""benchmarks/lmms_entry.py — the ``lmms_eval.models`` entry point payload (see pyproject.toml).

lmms-eval loads every entry point of that group while building its model registry, so this module imports nothing
but the manifest class: the model class itself (torch, our VLM) is imported only when ``vilex_vlm`` is requested.
"""
from lmms_eval.models.registry_v2 import ModelManifest

VILEX_VLM_MANIFEST = ModelManifest(model_id="vilex_vlm", simple_class_path="benchmarks.lmms_plugin.VilexVLM")
