"""vlm/projector.py — vision features -> LLM embedding width, registered by type name in ``PROJECTORS``.

* ``mlp2x_gelu``: linear_1 -> GELU (exact erf) -> linear_2, LLaVA-1.5's connector. The module names are those of
  HF ``LlavaMultiModalProjector`` (``linear_1``, ``act``, ``linear_2``), so its weights copy into an exported
  ``LlavaForConditionalGeneration`` key for key.
* ``linear``: one ``linear`` layer (LLaVA-1's connector; not exportable to HF Llava, which has no such option).

A VLM has one projector per feature group of its tower (``patch``, and ``vilex_tokens`` for that tower). They are
saved together in ONE folder, loadable on its own (``load_projectors``) — the file LLaVA users know as
``mm_projector.bin``:

    projector/model.safetensors   keys "<group>.<param>", e.g. "patch.linear_1.weight"
    projector/config.json         {"groups": {"patch": {"type": "mlp2x_gelu", "in_features": C, "out_features": H}}}
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from vilex.checkpoint import load_tensors, save_tensors
from vilex.errors import UserError
from vilex.registry import Registry

PROJECTORS: Registry[Any] = Registry("projector")


@PROJECTORS.register("mlp2x_gelu")
class MLP2xGeluProjector(nn.Module):
    """LLaVA-1.5's two-layer MLP with GELU (names match HF ``LlavaMultiModalProjector``)."""

    exportable = True

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, features):
        return self.linear_2(self.act(self.linear_1(features)))


@PROJECTORS.register("linear")
class LinearProjector(nn.Module):
    exportable = False

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, features):
        return self.linear(features)


class Projectors(nn.ModuleDict):
    """The projectors of a VLM, one per feature group, remembering each one's registry type and sizes."""

    def __init__(self, specs: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__({name: PROJECTORS.get(s["type"])(s["in_features"], s["out_features"])
                          for name, s in specs.items()})
        self.specs = {name: {"type": s["type"], "in_features": int(s["in_features"]),
                             "out_features": int(s["out_features"])} for name, s in specs.items()}

    @property
    def exportable(self) -> bool:
        return all(getattr(m, "exportable", False) for m in self.values())


def build_projectors(type_name: str, groups: Mapping[str, tuple[int, int]], out_features: int) -> Projectors:
    """One projector of type ``type_name`` per feature group ``{name: (count, width)}``."""
    return Projectors({name: {"type": type_name, "in_features": width, "out_features": out_features}
                       for name, (_, width) in groups.items()})


def projector_config(projectors: Projectors) -> dict[str, Any]:
    """What ``config.json`` of a saved projector folder holds."""
    return {"groups": {name: dict(spec) for name, spec in projectors.specs.items()}}


def save_projectors(folder: str | Path, projectors: Projectors, state_dict: Mapping[str, Any] | None = None) -> None:
    """Write the projector folder (``state_dict`` given = weights gathered elsewhere, e.g. under ZeRO-3)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = dict(state_dict) if state_dict is not None else projectors.state_dict()
    save_tensors(folder, tensors, projector_config(projectors))


def read_projector_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, config) of a saved projector folder (a one-line UserError when it is not one)."""
    tensors, config = load_tensors(folder)
    if "groups" not in config:
        raise UserError(f"{folder} is not a VLM projector folder: config.json has no 'groups'")
    return tensors, config


def load_projectors(folder: str | Path) -> Projectors:
    """The projectors saved in ``folder``, rebuilt on their own (no tower or LLM needed)."""
    tensors, config = read_projector_folder(folder)
    mods = Projectors(config["groups"])
    mods.load_state_dict(tensors)
    return mods


def check_compatible(projectors: Projectors, config: Mapping[str, Any], source: str | Path) -> None:
    """A UserError naming ``source`` unless the saved projector config matches the model's projectors."""
    mine = projector_config(projectors)["groups"]
    theirs = dict(config.get("groups", {}))
    if mine != theirs:
        raise UserError(f"projector in {source} does not fit this model: saved {theirs}, model {mine}")
