"""scripts/bench/serve_latency.py — how long `vilex serve` takes to show a reconstruction (target: under 2 s on the
toy assets on 2 CPU cores), with the plain pipeline call as the baseline.

The same reconstruction (the gallery's first scene, m tokens, the page's defaults: 25 DDIM steps, CFG 3, seed 0),
three ways:

(a) baseline: ``ViLexPipeline.reconstruct([image], num_tokens=m, seed=0)``, what ``vilex reconstruct`` does;
(b) the page's handler ``Handlers.reconstruct_tokens`` (adds the PSNR and the enlarged copy the page shows);
(c) the page over HTTP: the token slider's endpoint ``/reconstruct_tokens`` called with gradio's own client against
    the page served on a loopback port: the request, the queue, the PNG and the event stream a browser waits for.

Each runs ``--repeats`` times, alternating a, b, c after one warm-up call each (the machine is shared: the median and
the best are printed, with the load average). Ratios are against (a)'s median. Offline, CPU.

    python scripts/bench/serve_latency.py [--tokens 16] [--steps 25] [--repeats 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

TARGET_S = 2.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16, help="m (default 16: the toy ViLex's n)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25: the page's default)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2: the 2-core target)")
    args = p.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", DISABLE_TQDM="1")

    import torch

    torch.set_num_threads(args.threads)
    from serve.app import build_app, launch
    from serve.gallery import toy_test_scenes
    from serve.handlers import Handlers, SamplingDefaults
    from serve.models import load_models, resolve_checkpoints

    started = time.perf_counter()
    models = load_models(resolve_checkpoints(vlms=[]), torch.device("cpu"))
    handlers = Handlers(models, toy_test_scenes(1, models.pipeline.decoder.image_size),
                        SamplingDefaults(steps=args.steps))
    image = handlers.scenes[0].image
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = build_app(handlers)
    launch(app, "127.0.0.1", port, share=False, block=False)
    print(f"toy ViLex loaded and the page served in {time.perf_counter() - started:.1f} s; torch threads "
          f"{torch.get_num_threads()}, m = {args.tokens}, {args.steps} steps")

    from gradio_client import Client, handle_file

    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    scene = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"serve_latency_{os.getpid()}.png")
    image.save(scene)
    client.predict(handle_file(scene), api_name="/upload")  # the session's image, as a visitor's upload
    os.remove(scene)

    def pipeline() -> None:
        models.pipeline.reconstruct([image], num_tokens=args.tokens, guidance_scale=3.0,
                                    num_inference_steps=args.steps, seed=0, output_type="pt")

    def handler() -> None:
        view = handlers.reconstruct_tokens(image, args.tokens, 0, args.steps, 3.0)
        assert view.message == "", view.message

    def http() -> None:
        _, psnr_text, message = client.predict(args.tokens, 0, args.steps, 3.0, api_name="/reconstruct_tokens")
        assert message == "" and "dB" in psnr_text, (psnr_text, message)

    ways = {"(a) pipeline.reconstruct (baseline)": pipeline, "(b) page handler": handler,
            "(c) page over HTTP (/reconstruct_tokens)": http}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for fn in ways.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    app.close()

    base = statistics.median(times["(a) pipeline.reconstruct (baseline)"])
    print(f"\nload average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (the machine is shared)")
    print(f"{'':44s} {'median':>8s} {'best':>8s} {'ratio':>7s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:44s} {median:7.3f}s {min(values):7.3f}s {median / base:6.2f}x")
    shown = statistics.median(times["(c) page over HTTP (/reconstruct_tokens)"])
    verdict = "met" if shown < TARGET_S else "NOT met"
    print(f"\ntarget: a reconstruction shows in < {TARGET_S:g} s: {verdict} ({shown:.2f} s over HTTP, median)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
