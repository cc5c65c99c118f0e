"""train/dry_run.py — ``--dry-run``: everything a run would build and read is checked; nothing is trained.

A dry run resolves every registry name, checks that every file and folder the run reads exists (data, pretrained
weights or their hub-cache entries, the DeepSpeed config, the checkpoint a resume starts from), builds the models on
the meta device (``vilex.models.registry.weightless``: real shapes, no weights read) and prints the values the run
would actually use: the resolutions (the models decide them, not the data config), global batch = micro ×
accumulation × processes, the step count, the optimizer groups. Every problem is collected, not only the first;
the command exits 2 when there is any, so a job script can run the dry run first and stop on a bad config.

``DryRun`` is the report; ``plan_pretrain`` fills it for ``vilex pretrain`` (stage 2's is ``vlm.dry_run``).
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, TextIO

from vilex.errors import UserError

# what a check may raise and still be a finding about the user's input (anything else is a bug: a traceback)
FINDINGS = (UserError, OSError, ValueError, KeyError, ImportError)


@dataclass
class DryRun:
    """Facts (what the run would use) and problems (what would stop it), printed as one report."""

    title: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def fact(self, label: str, value: Any) -> None:
        self.facts.append((label, str(value)))

    @contextlib.contextmanager
    def check(self, what: str) -> Iterator[None]:
        """Run a block; a finding it raises becomes a problem named ``what``, and the dry run goes on."""
        try:
            yield
        except FINDINGS as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            kind = "" if isinstance(e, UserError) else f"{type(e).__name__}: "
            self.problems.append(f"{kind}{text}" if text.startswith(what) else f"{what}: {kind}{text}")

    def path(self, label: str, path: str | Path | None, kind: str = "file") -> bool:
        """A path the run reads: a fact when it exists, a problem when it does not."""
        if path is None:
            return False
        p = Path(path).expanduser()
        ok = p.is_dir() if kind == "folder" else p.is_file() if kind == "file" else p.exists()
        if ok:
            self.fact(label, p)
        else:
            self.problems.append(f"{label}: {kind} not found: {p}")
        return ok

    def report(self, stream: TextIO | None = None) -> int:
        """Print the report; the exit code: 0 when the run would start, 2 when it would not."""
        out = stream or sys.stdout
        print(self.title, file=out)
        width = max((len(label) for label, _ in self.facts), default=0)
        for label, value in self.facts:
            print(f"  {label:<{width}}  {value}", file=out)
        if self.problems:
            print(f"\n{len(self.problems)} problem(s); the run would stop:", file=out)
            for problem in self.problems:
                print(f"  - {problem}", file=out)
            return 2
        print("\nno problems found: nothing was trained or written", file=out)
        return 0


def count_parameters(params: list[Any]) -> str:
    return f"{sum(p.numel() for p in params):,} params"


def describe_source(cfg: Any) -> str:
    """What a data source holds, listed (names only, no image decoded): '1,234 images' or '56 shards'."""
    from vilex.data import build_source
    from vilex.data.sources import MapImageSource

    source = build_source(cfg)
    if isinstance(source, MapImageSource):
        if len(source) == 0:
            raise UserError(f"{source} holds no images")
        return f"{source}: {len(source):,} images"
    return f"{source}: {source.size:,} shards"


def describe_resume(run: DryRun, checkpoints: Path, resume: str | None) -> None:
    """Where ``--resume`` would start: verified as the run would (an explicit folder must verify)."""
    from vilex.checkpoint import CheckpointManager

    if not resume:
        run.fact("start", "fresh (no --resume)")
        return
    with run.check("--resume"):
        found = CheckpointManager(checkpoints, keep_last=None).resolve(resume)
        run.fact("start", f"resume from {found}" if found else f"fresh (no checkpoint under {checkpoints})")


def describe_batches(run: DryRun, where: str, global_batch_size: int, micro_batch_size: int | None, processes: int,
                     unit: str) -> Any:
    from vilex.train.batching import plan_batches

    with run.check(f"{where}.global_batch_size"):
        plan = plan_batches(global_batch_size, micro_batch_size, processes, where=where)
        run.fact("global batch", f"{plan.global_batch_size} {unit} = {plan.micro_batch_size} micro × "
                                 f"{plan.grad_accum} accumulation × {processes} process{'es' if processes != 1 else ''}")
        return plan
    return None


def plan_pretrain(cfg: Any, resume: str | None = None, processes: int = 1, title: str = "vilex pretrain") -> DryRun:
    """The dry run of ``vilex pretrain``: ``cfg`` is a loaded ``PretrainConfig``."""
    from vilex.models.decoders import build_frozen_decoder
    from vilex.models.encoder import ViLexEncoder
    from vilex.models.registry import FROZEN_DECODERS, VISION_TOWERS, weightless
    from vilex.models.towers import build_vision_tower
    from vilex.models.vilex_model import ViLexModel
    from vilex.train.data import model_views

    run = DryRun(f"{title} --dry-run: {processes} process(es); models built on the meta device, nothing trained")
    tc, mc = cfg.train, cfg.model

    # models: the decoder and the encoder separately, so a bad one does not hide the other's problems
    decoder = encoder = None
    with run.check("model.decoder"):
        FROZEN_DECODERS.get(mc.decoder.type)
        with weightless():
            decoder = build_frozen_decoder(mc.decoder)
        native = decoder.native_image_size
        chosen = "native" if mc.decoder.resolution is None else f"model.decoder.resolution; native {native}"
        run.fact("decoder", f"{mc.decoder.type} from {mc.decoder.name_or_path} ({mc.decoder.dtype})")
        run.fact("decoder resolution", f"{decoder.image_size}² ({chosen}; multiples of {decoder.resolution_multiple})")
        run.fact("model space", f"{tuple(decoder.model_space_shape)} per image")
        run.fact("text context", f"{decoder.context_length} tokens, embedding width {decoder.embed_width}")
    with run.check("model.vit"):
        VISION_TOWERS.get(mc.vit.type)
        if decoder is None:  # the encoder needs the decoder's embeddings; still check the tower on its own
            with weightless():
                build_vision_tower(mc.vit)
    if decoder is not None:
        with run.check("model.vit / model.pooler"):
            with weightless():
                encoder = ViLexEncoder.build(mc.vit, mc.pooler, decoder.embedding_table, decoder.context_length,
                                             decoder.token_heads)
            source = "random init (model.vit.init)" if mc.vit.init is not None else mc.vit.name_or_path
            run.fact("vision tower", f"{mc.vit.type} from {source}: input {encoder.image_size}², width "
                                     f"{encoder.vit.hidden_size}, feature_layer {mc.vit.feature_layer}")
            run.fact("ViLex tokens", f"{encoder.num_tokens} × {encoder.token_width} (≤ {decoder.context_length - 2} "
                                     f"fit the text context); TailDrop p={mc.taildrop.prob}")
    model = None
    if encoder is not None:
        with run.check("model"):
            model = ViLexModel(encoder, decoder, mc)
            views = model_views(model, cfg.data.train)
            run.fact("views", ", ".join(f"{name} {v.size}² {v.fit}" for name, v in views.items()))
            bad = [k for k in cfg.val.token_counts if k != -1 and not 1 <= k <= encoder.num_tokens]
            if bad:
                raise UserError(f"val.token_counts {bad} outside 1..{encoder.num_tokens} (or -1 = all)")

    # batches, steps, optimizer
    plan = describe_batches(run, "train", tc.global_batch_size, tc.micro_batch_size, processes, "images")
    run.fact("steps", f"{tc.max_steps:,}" + (f" ({tc.max_steps * plan.global_batch_size:,} images)" if plan else ""))
    if model is not None:
        lrs = {"vit": tc.optim.lr_vit, "pooler": tc.optim.lr_pooler}
        for name, params in model.trainable_parameter_groups().items():
            state = f"lr {lrs[name]:g}, {count_parameters(params)}" if name in tc.trainable else "frozen"
            run.fact(f"optimizer group {name}", state)
        run.fact("schedule", f"warmup {tc.optim.warmup_steps} steps, cosine to {tc.optim.min_lr_ratio:g} × lr; "
                             f"weight decay {tc.optim.weight_decay:g}, grad clip {tc.optim.grad_clip}")
    if tc.init_from is not None:
        with run.check("train.init_from"):
            from vilex.pipeline import resolve_vilex_checkpoint
            run.fact("encoder init", f"weights from {resolve_vilex_checkpoint(tc.init_from)} (new schedule)")
    run.fact("strategy", f"{tc.strategy}, {tc.precision}")
    if tc.strategy == "deepspeed":
        run.path("deepspeed config", tc.deepspeed_config)
    ema = f"EMA decay {tc.ema_decay:g}; pipeline/ holds the {tc.pipeline_weights} weights" if tc.ema_decay else \
        "no EMA; pipeline/ holds the trained weights"
    run.fact("checkpoints", f"every {tc.checkpoint_every} steps, last {tc.keep_last} kept; {ema}")

    # data
    with run.check("data.train"):
        run.fact("data.train", describe_source(cfg.data.train))
    if cfg.data.val is not None:
        with run.check("data.val"):
            run.fact("data.val", describe_source(cfg.data.val))
    if decoder is not None and decoder.has_vae:
        where = Path(cfg.latent_cache.dir).expanduser()
        built = (f"{where} (completed before step 1, each process encoding its share of the shards; the decoder view "
                 f"is then never decoded)")
        run.fact("latent cache", built if cfg.latent_cache.enabled else "off")
    run.fact("output", tc.output_dir)
    describe_resume(run, Path(tc.output_dir) / "checkpoints", resume)
    return run
