"""scripts/launch.sh runs any `vilex` training command on several processes / nodes: a tiny `vilex pretrain` on 2
processes through the launch_pretrain.sh wrapper, a tiny `vilex train-vlm` as 2 torchrun "nodes" of 1 process
(NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT, two launcher invocations), and under the DeepSpeed launcher; all on
CPU (gloo), launched for real."""
import json
import random
import subprocess
import sys

import pytest
from pretrain_helpers import REPO, build_tiny_world, cli_args, env, summary

from vlm.tiny import build_tiny_world as build_tiny_vlm_world

pytestmark = pytest.mark.usefixtures("one_thread")

LAUNCH = REPO / "scripts" / "launch.sh"
VLM_TINY = REPO / "configs" / "vlm" / "tiny.yaml"


def _env(**extra):
    return {**env(), "PYTHON": sys.executable, "MASTER_PORT": str(random.randint(20000, 40000)), **extra}


def _run(cmd, timeout=240, **extra):
    return subprocess.run([str(c) for c in cmd], env=_env(**extra), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


@pytest.fixture(scope="module")
def vlm_world(tmp_path_factory):
    return build_tiny_vlm_world(tmp_path_factory.mktemp("launch_vlm"), n_align=8, n_instruct=4)


def _vlm_args(world, out):
    args = ["train-vlm", "--config", VLM_TINY, "--stage", "align"]
    for o in world.overrides(out):
        args += ["--set", o]
    return args


def test_usage_errors_exit_2():
    usage = _run(["bash", LAUNCH])
    assert usage.returncode == 2 and "scripts/launch.sh NPROC COMMAND" in usage.stdout
    bad = _run(["bash", LAUNCH, "two", "pretrain"])
    assert bad.returncode == 2 and bad.stderr.startswith("error: NPROC must be a positive number")
    launcher = _run(["bash", LAUNCH, "1", "pretrain"], LAUNCHER="mpi")
    assert launcher.returncode == 2
    assert launcher.stderr.strip() == "error: LAUNCHER must be torchrun or deepspeed, got 'mpi'"
    wrapper = _run(["bash", REPO / "scripts" / "launch_pretrain.sh", "2"])
    assert wrapper.returncode == 2 and "launch_pretrain.sh NPROC CONFIG" in wrapper.stdout


def test_pretrain_on_two_processes_through_launch_pretrain(tmp_path):
    world = build_tiny_world(tmp_path / "world", n=16)
    out = tmp_path / "run"
    args = cli_args(world, out, "train.max_steps=4", "train.checkpoint_every=4", "val.every=1000")
    assert args[:3] == ["pretrain", "--config", str(REPO / "configs" / "vilex" / "tiny.yaml")]
    done = _run(["bash", REPO / "scripts" / "launch_pretrain.sh", "2", args[2], *args[3:]])
    assert done.returncode == 0, done.stderr[-3000:]
    result = summary(out)
    assert result["steps"] == 4 and len(result["losses"]) == 4
    ckpt = out / "checkpoints" / "checkpoint-4"
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    assert (ckpt / "rank0.pt").is_file() and (ckpt / "rank1.pt").is_file()


def test_train_vlm_as_two_torchrun_nodes_matches_one_process(vlm_world, tmp_path):
    """Two launcher invocations, NODE_RANK 0 and 1 of NNODES=2 (1 process each) meeting at MASTER_ADDR:MASTER_PORT,
    train the same steps on the same samples as one process with 2 accumulation micro-batches."""
    from vilex.config import load_config
    from vlm.config import VLMConfig
    from vlm.train import train_vlm

    out = tmp_path / "two_nodes"
    port = str(random.randint(20000, 40000))
    nodes = [subprocess.Popen([str(c) for c in ["bash", LAUNCH, "1", *_vlm_args(vlm_world, out)]],
                              env=_env(NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    try:
        results = [node.communicate(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    two = summary(out / "align")
    assert two["steps"] == 2 and two["data"]["samples"] == 8  # both nodes' samples counted
    ckpt = out / "align" / "checkpoints" / "checkpoint-2"
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2

    one = train_vlm(load_config(VLMConfig, VLM_TINY, vlm_world.overrides(tmp_path / "one")), "align")
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)


@pytest.mark.slow
def test_train_vlm_under_the_deepspeed_launcher(vlm_world, tmp_path):
    out = tmp_path / "ds"
    done = _run(["bash", LAUNCH, "2", *_vlm_args(vlm_world, out)], LAUNCHER="deepspeed")
    assert done.returncode == 0, done.stderr[-3000:]
    result = summary(out / "align")
    assert result["steps"] == 2 and result["data"]["samples"] == 8
    ckpt = out / "align" / "checkpoints" / "checkpoint-2"
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
