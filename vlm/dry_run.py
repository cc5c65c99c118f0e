"""vlm/dry_run.py — ``vilex train-vlm --dry-run``: one stage checked end to end, nothing trained or written.

The tower (a SigLIP, or a stage-1 ViLex checkpoint: a run folder resolves to its latest checkpoint, as the run
pins it), the tokenizer and the LLM are built on the meta device from their configs (every path and hub-cache entry
checked, real shapes, no weights read); the weights a stage starts from (``init_from``, ``--resume``) are resolved
and verified as the run would; the LLaVA JSON is read and a spread sample of its image paths is looked up; then the
effective values are printed: image size and tokens, global batch = micro × accumulation × processes, steps (from
the data when ``max_steps`` is null), optimizer groups. The report itself is ``vilex.train.dry_run.DryRun``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vilex.errors import UserError
from vilex.train.dry_run import DryRun, count_parameters, describe_batches, describe_resume

IMAGES_LOOKED_UP = 1000  # image paths checked, spread over the file: seconds even on a network file system


def describe_images(run: DryRun, records: list[dict[str, Any]], image_root: Path | None, on_bad_image: str,
                    max_bad_fraction: float) -> None:
    """How many samples have an image, and whether a spread sample of those image files exists."""
    with_image = [r["image"] for r in records if r.get("image")]
    if not with_image:
        run.fact("images", "none (text-only samples)")
        return
    root = Path(image_root).expanduser() if image_root is not None else Path(".")
    if image_root is not None and not root.is_dir():
        run.problems.append(f"data.image_root: folder not found: {root}")
        return
    stride = max(1, len(with_image) // IMAGES_LOOKED_UP)
    looked = with_image[::stride][:IMAGES_LOOKED_UP]
    missing = [p for p in looked if not (root / p).is_file()]
    run.fact("images", f"{len(with_image):,} samples with an image under {root}; {len(looked) - len(missing)} of "
                       f"{len(looked)} looked up exist")
    if not missing:
        return
    fraction = len(missing) / len(looked)
    first = root / missing[0]
    if on_bad_image == "error":
        run.problems.append(f"data: {len(missing)} of {len(looked)} image files looked up are missing (first: {first})"
                            f" and on_bad_image is 'error'")
    elif fraction > max_bad_fraction:
        run.problems.append(f"data: {len(missing)} of {len(looked)} image files looked up are missing ({fraction:.1%}, "
                            f"above max_bad_fraction {max_bad_fraction:g}; first: {first})")


def plan_vlm(cfg: Any, stage: str, resume: str | None = None, processes: int = 1) -> DryRun:
    """The dry run of ``vilex train-vlm --stage STAGE``: ``cfg`` is a loaded ``VLMConfig``."""
    from vilex.models.registry import weightless
    from vlm.config import template_for
    from vlm.data import read_llava_json
    from vlm.model import STAGE_TRAINS, VLM, read_checkpoint_meta
    from vlm.projector import PROJECTORS
    from vlm.towers import VLM_TOWERS
    from vlm.train import resolve_init_from

    sc = cfg.stage(stage)
    mc = cfg.model
    run = DryRun(f"vilex train-vlm --stage {stage} --dry-run: {processes} process(es); models built on the meta "
                 "device, nothing trained")

    with run.check("model.tower"):
        tower_class = VLM_TOWERS.get(mc.tower.type)
        pinned = tower_class.pinned_reference(mc.tower.name_or_path)
        if pinned != mc.tower.name_or_path:
            run.fact("tower checkpoint", f"{mc.tower.name_or_path} -> {pinned} (its latest)")
            mc.tower.name_or_path = pinned
    with run.check("model.projector.type"):
        PROJECTORS.get(mc.projector.type)

    model = None
    with run.check("model"), weightless():
        model = VLM.build(mc)
    if model is not None:
        run.fact("tower", f"{mc.tower.type} from {mc.tower.name_or_path}: input {model.image_size}², "
                          f"{model.num_image_tokens} image tokens, feature_layer {mc.tower.feature_layer}")
        run.fact("LLM", f"{mc.llm.name_or_path} ({mc.llm.dtype}, {mc.llm.attn_implementation}), "
                        f"{count_parameters(list(model.llm.parameters()))}; tokenizer {len(model.tokenizer):,} "
                        f"tokens")
    if sc.init_from:
        with run.check(f"{stage}.init_from"):
            start = resolve_init_from(cfg, stage, sc.init_from)
            components = read_checkpoint_meta(start)["components"]
            run.fact("starts from", f"{start} ({', '.join(components)})")

    # data
    records: list[dict[str, Any]] = []
    with run.check(f"{stage}.data.json"):
        if sc.data.json is None:
            raise UserError("not set: give the LLaVA-format conversation file")
        records = read_llava_json(sc.data.json)
        run.fact("data", f"{sc.data.json}: {len(records):,} samples, template {template_for(stage, sc)}, "
                         f"max_length {sc.data.max_length}, packing {'on' if sc.data.packing else 'off'}")
        describe_images(run, records, sc.data.image_root, sc.data.on_bad_image, sc.data.max_bad_fraction)
        run.fact("bad images", f"{sc.data.on_bad_image}" + (f" (stop above {sc.data.max_bad_fraction:g} of the samples "
                                                           "seen)" if sc.data.on_bad_image == "skip" else ""))

    # batches, steps, optimizer
    describe_batches(run, stage, sc.global_batch_size, sc.micro_batch_size, processes, "samples")
    if sc.max_steps is not None:
        run.fact("steps", f"{sc.max_steps:,} ({stage}.max_steps)")
    elif records:
        per_epoch = len(records) // sc.global_batch_size
        if per_epoch == 0:
            run.problems.append(f"{stage}: {len(records)} samples make no global batch of {sc.global_batch_size}")
        run.fact("steps", f"{per_epoch * sc.epochs:,} = {per_epoch:,} per epoch × {sc.epochs} epoch(s) "
                          f"({len(records) % sc.global_batch_size} samples of a partial batch unused per epoch)")
    if model is not None:
        with run.check(f"{stage}.trainable"):
            model.set_trainable(sc.trainable or STAGE_TRAINS[stage])
            for group in model.parameter_groups(sc.lr, sc.tower_lr):
                run.fact(f"optimizer group {group['name']}", f"lr {group['lr']:g}, {count_parameters(group['params'])}")
    run.fact("schedule", f"warmup {sc.warmup_ratio:g} of the steps, cosine to {sc.min_lr_ratio:g} × lr; weight "
                         f"decay {sc.weight_decay:g}, grad clip {sc.grad_clip}")
    run.fact("strategy", f"{sc.strategy}, {sc.precision}")
    if sc.strategy == "deepspeed":
        run.path("deepspeed config", sc.deepspeed_config)
    run.fact("output", cfg.stage_dir(stage))
    describe_resume(run, cfg.stage_dir(stage) / "checkpoints", resume)
    return run
