"""Exact resume: SIGKILL a run at a random moment, resume with --resume auto, get the same losses (CPU, bitwise).

Single process (torch strategy) and 2-process DeepSpeed ZeRO-2 (gloo), launched for real.
"""
import shutil

import pytest
from pretrain_helpers import build_tiny_world, cli_args, run_and_kill, run_cli, summary


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("world"))


def _resume_case(world, tmp_path, nproc, extra, steps, every, kill_after):
    ref_out, out = tmp_path / "reference", tmp_path / "killed"
    common = [f"train.max_steps={steps}", f"train.checkpoint_every={every}", "val.every=1000", *extra]
    ref = run_cli(cli_args(world, ref_out, *common), nproc=nproc)
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = summary(ref_out)["losses"]
    assert len(reference) == steps

    rc = run_and_kill(cli_args(world, out, *common), out, after_checkpoint=kill_after, nproc=nproc)
    assert rc != 0, "the run finished before it could be killed (test did not test a kill)"
    assert not (out / "summary.json").exists()
    resumed = run_cli(cli_args(world, out, *common) + ["--resume", "auto"], nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = summary(out)["losses"]
    assert got == reference  # bit-identical floats, every step, including those after the kill


def test_resume_after_sigkill_single_process(world, tmp_path):
    _resume_case(world, tmp_path, 1, [], steps=12, every=3, kill_after=3)


def test_resume_after_sigkill_deepspeed_zero2_two_processes(world, tmp_path):
    ds = ["train.strategy=deepspeed", "train.deepspeed_config=configs/deepspeed/zero2.json"]
    _resume_case(world, tmp_path, 2, ds, steps=8, every=2, kill_after=2)


def test_resume_refuses_other_world_size(world, tmp_path):
    out = tmp_path / "run"
    done = run_cli(cli_args(world, out, "train.max_steps=2", "train.checkpoint_every=2", "val.every=1000"))
    assert done.returncode == 0, done.stderr[-2000:]
    ds = ["train.strategy=deepspeed", "train.deepspeed_config=configs/deepspeed/zero2.json",
          "train.max_steps=4", "val.every=1000"]
    again = run_cli(cli_args(world, out, *ds) + ["--resume", "auto"], nproc=2)
    assert again.returncode != 0
    assert "exact resume needs the same" in again.stderr
    shutil.rmtree(out)


def test_resume_refuses_other_frozen_decoder_weights(world, tmp_path):
    """The same decoder path with retrained weights (a re-shipped asset) is another experiment: refuse it."""
    import torch
    from safetensors.torch import load_file, save_file

    own = tmp_path / "world"
    shutil.copytree(world / "decoder", own / "decoder")
    (own / "data").symlink_to(world / "data")
    out = tmp_path / "run"
    common = ["train.checkpoint_every=2", "val.every=1000"]
    done = run_cli(cli_args(own, out, "train.max_steps=2", *common))
    assert done.returncode == 0, done.stderr[-2000:]

    copied = tmp_path / "copy"  # a byte-identical copy elsewhere resumes: the fingerprint is of content
    shutil.copytree(own / "decoder", copied)
    again = run_cli(cli_args(own, out, "train.max_steps=3", f"model.decoder.name_or_path={copied}", *common)
                    + ["--resume", "auto"])
    assert again.returncode == 0, again.stderr[-2000:]

    weights = next((own / "decoder" / "unet").glob("*.safetensors"))
    tensors = load_file(weights)
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name] + 0.01 * torch.randn_like(tensors[name])
    save_file(tensors, weights)
    changed = run_cli(cli_args(own, out, "train.max_steps=4", *common) + ["--resume", "auto"])
    assert changed.returncode != 0
    assert "frozen_decoder_weights" in changed.stderr and "exact resume needs the same" in changed.stderr
