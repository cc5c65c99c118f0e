"""The generic registry: lookup, duplicate protection, and errors that list the registered names."""
import pytest

from vilex.errors import UserError
from vilex.registry import Registry, RegistryError


def test_register_get_build():
    reg: Registry = Registry("vision tower")

    @reg.register("siglip")
    class Siglip:
        def __init__(self, width):
            self.width = width

    reg.register("timm", dict)
    assert reg.get("siglip") is Siglip
    assert reg.build("siglip", width=7).width == 7
    assert reg.names() == ["siglip", "timm"]
    assert "timm" in reg and "clip" not in reg and len(reg) == 2


def test_unknown_name_lists_registered_names_and_suggests():
    reg: Registry = Registry("frozen decoder")
    reg.register("stable_diffusion", object)
    reg.register("pixel_unet", object)
    with pytest.raises(RegistryError) as ei:
        reg.get("stable_difusion")
    msg = str(ei.value)
    assert "unknown frozen decoder 'stable_difusion'" in msg
    assert "Did you mean 'stable_diffusion'?" in msg
    assert "Registered: pixel_unet, stable_diffusion" in msg
    assert isinstance(ei.value, UserError)  # the CLI reports it as one line, exit 2


def test_duplicate_name_rejected_but_reregistering_same_object_ok():
    reg: Registry = Registry("llm")
    reg.register("qwen2", int)
    reg.register("qwen2", int)  # idempotent (module re-import)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("qwen2", float)
