"""serve/cli.py — ``vilex serve``: the interactive page over a ViLex checkpoint and VLM checkpoints.

    vilex serve                                   # the shipped toy assets, http://127.0.0.1:7860
    vilex serve --vilex runs/vilex/sd21 --vlm ours=runs/vlm/vilex/instruct base=runs/vlm/siglip/instruct --port 8000

Start-up order: check every checkpoint path and the port (a mistake is one line, exit code 2), then load the models,
then build and launch the page. gradio is imported only here, inside the command, so ``vilex --help`` stays instant.
The page binds to 127.0.0.1 unless ``--host`` says otherwise; ``--share`` (a public gradio link) is off by default.
"""
from __future__ import annotations

import argparse
import logging
import socket

from vilex.cli.main import command
from vilex.cli.stage1_cmd import add_device_arg
from vilex.errors import UserError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vilex", default=None, metavar="CKPT",
                   help="a ViLex checkpoint: its folder, a `vilex pretrain` checkpoint-<step> folder, or the run "
                        "folder (default: the shipped toy ViLex, assets/toy/vilex)")
    p.add_argument("--decoder", default=None, help="override the frozen decoder's hub id / folder from the checkpoint")
    p.add_argument("--vlm", nargs="*", default=None, metavar="[NAME=]CKPT",
                   help="VLM checkpoints for the Ask tab, answered side by side (default: the shipped toy VLMs with "
                        "the SigLIP, ViLex and ViLex + tokens towers; `--vlm` alone: none)")
    p.add_argument("--host", default=LOOPBACK, help=f"address to listen on (default {LOOPBACK}: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    add_device_arg(p)
    p.add_argument("--seed", type=int, default=0, help="the page's initial sampling seed (default 0)")
    p.add_argument("--steps", type=int, default=25, help="the page's initial DDIM steps (default 25)")
    p.add_argument("--guidance-scale", type=float, default=3.0,
                   help="the page's initial classifier-free guidance against the empty prompt (default 3)")
    p.add_argument("--tfg-scale", type=float, default=None,
                   help="the page's initial Text-Free Guidance w (default: the toy claims' w with the toy ViLex, "
                        "else 3 as `vilex compose`)")
    p.add_argument("--gallery", type=int, default=12, help="held-out toy scenes to pick from (default 12)")


def check_port(host: str, port: int) -> None:
    """A UserError unless ``host:port`` can be listened on now (checked before minutes of model loading)."""
    if not 0 < port < 65536:
        raise UserError(f"--port must be 1..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: not an address of this machine ({e})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); is another server there? pass --port") \
                from None


def _check_settings(args: argparse.Namespace) -> None:
    """The page's initial settings must be values its controls accept."""
    from serve.handlers import MAX_SEED, MAX_STEPS

    if args.gallery < 0:
        raise UserError(f"--gallery must be >= 0, got {args.gallery}")
    if not 1 <= args.steps <= MAX_STEPS:
        raise UserError(f"--steps must be 1..{MAX_STEPS}, got {args.steps}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be 0..{MAX_SEED}, got {args.seed}")
    for flag, value in (("--guidance-scale", args.guidance_scale), ("--tfg-scale", args.tfg_scale)):
        if value is not None and not value >= 0:
            raise UserError(f"{flag} must be >= 0, got {value}")


@command("serve", help="an interactive page (gradio): reconstruct, compose and ask, on the toy assets or your "
                       "checkpoints")(_configure)
def run_serve(args: argparse.Namespace) -> int:
    from serve.models import load_models, resolve_checkpoints
    from vilex.train.distributed import resolve_device

    _check_settings(args)
    checkpoints = resolve_checkpoints(args.vilex, args.decoder, args.vlm)
    device = resolve_device(args.device, "--device")
    check_port(args.host, args.port)
    if args.host != LOOPBACK:
        log.warning("listening on %s: the page is reachable from other machines", args.host)

    from serve.app import build_app, launch
    from serve.gallery import toy_test_scenes
    from serve.handlers import Handlers, SamplingDefaults

    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests, one log line each
    models = load_models(checkpoints, device)
    tfg_scale = args.tfg_scale
    if tfg_scale is None:
        from toy.claims import TFG_SCALE

        tfg_scale = TFG_SCALE if args.vilex is None else SamplingDefaults.tfg_scale
    defaults = SamplingDefaults(seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
                                tfg_scale=tfg_scale)
    handlers = Handlers(models, toy_test_scenes(args.gallery, models.pipeline.decoder.image_size), defaults)
    app = build_app(handlers)
    try:
        launch(app, args.host, args.port, args.share)
    except OSError as e:  # the port was taken between the check and the launch
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e}") from None
    return 0
