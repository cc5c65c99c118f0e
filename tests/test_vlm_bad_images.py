"""Stage-2 bad images: skipped and counted by default (summary and log), the run stopped with the counts above
``max_bad_fraction`` (once enough samples were seen to judge), and ``on_bad_image: error`` still selectable."""
import logging

import pytest
from pretrain_helpers import REPO, run_cli

from vilex.cli.main import main as vilex_main
from vilex.errors import UserError
from vlm.config import ConversationDataConfig
from vlm.data import read_llava_json
from vlm.templates import SampleError
from vlm.tiny import build_tiny_world, write_tiny_llava_data
from vlm.train import train_vlm

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = REPO / "configs" / "vlm" / "tiny.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny LLM and tower (each test writes its own data)."""
    return build_tiny_world(tmp_path_factory.mktemp("bad_world"), n_align=4, n_instruct=16)


def _break_images(root, records, missing, corrupt):
    for i in missing:
        (root / records[i]["image"]).unlink()
    for i in corrupt:
        (root / records[i]["image"]).write_bytes(b"not an image")


def _config(world, tmp_path, data_root, **data):
    cfg = world.config(tmp_path / "run")
    cfg.instruct.init_from = None
    cfg.instruct.data.json, cfg.instruct.data.image_root = data_root / "data.json", data_root
    for k, v in data.items():
        setattr(cfg.instruct.data, k, v)
    return cfg


def _data(tmp_path):
    """16 instruct samples, each with an image."""
    root = tmp_path / "data"
    records = read_llava_json(write_tiny_llava_data(root, n=16, kind="instruct", text_only_every=0))
    assert all("image" in r for r in records)
    return root, records


@pytest.fixture()
def damaged(tmp_path):
    """1 missing and 1 corrupt image among 16 samples."""
    root, records = _data(tmp_path)
    _break_images(root, records, missing=[3], corrupt=[10])
    return root, records


def test_skip_is_the_default():
    assert ConversationDataConfig().on_bad_image == "skip" and ConversationDataConfig().max_bad_fraction == 0.001


def test_a_few_bad_images_are_skipped_counted_and_logged(world, tmp_path, damaged, caplog):
    root, _ = damaged
    cfg = _config(world, tmp_path, root)  # the defaults: skip, max_bad_fraction 0.1 %
    with caplog.at_level(logging.WARNING):
        result = train_vlm(cfg, "instruct")
    assert result["steps"] == 4  # the run finished: 16 samples seen are far too few to judge 0.1 %
    assert result["data"]["samples"] == 14
    assert result["data"]["skipped"] == {"not_an_image": 1, "unreadable": 1}
    named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped sample")]
    assert sorted(named) == ["skipped sample 'instruct-0003': image images/0003.png: unreadable: "
                             f"{root / 'images' / '0003.png'}: FileNotFoundError",
                             "skipped sample 'instruct-0010': image images/0010.png: not_an_image: 12 bytes starting "
                             "b'not an i'"]
    totals = [r.getMessage() for r in caplog.records if "had a bad image" in r.getMessage()]
    # the seeded plan puts both broken samples into step 1 (4 samples); a total is logged when it grows
    assert totals == ["instruct step 1: 2 of 4 samples seen (50 %) had a bad image and were skipped (not_an_image 1, "
                      "unreadable 1); above max_bad_fraction 0.001, but too few samples seen to judge (4 < 10000)"]


MOSTLY_BAD_ERROR = ("error: instruct: 16 of 20 samples seen (80 %) had a bad image and were skipped (not_an_image 8, "
                    "unreadable 8), more than instruct.data.max_bad_fraction = 0.5 (50 %) at step 5; fix or remove "
                    "them (the log names the first ones), or raise instruct.data.max_bad_fraction")


def _mostly_bad_args(world, tmp_path):
    """12 of 16 images bad (75 %), max_bad_fraction 0.5, judged from 20 samples seen on (10 / 0.5): with 4 samples
    per step the run cannot stop before step 5, although 12 of the first 16 were bad."""
    root, records = _data(tmp_path)
    _break_images(root, records, missing=range(0, 12, 2), corrupt=range(1, 12, 2))
    args = ["train-vlm", "--config", str(TINY), "--stage", "instruct"]
    for o in [*world.overrides(tmp_path / "run"), "instruct.init_from=null", "instruct.epochs=3",
              f"instruct.data.json={root / 'data.json'}", f"instruct.data.image_root={root}",
              "instruct.data.max_bad_fraction=0.5"]:
        args += ["--set", o]
    return args


def test_above_max_bad_fraction_the_run_stops_with_the_counts(world, tmp_path, capsys):
    assert vilex_main(_mostly_bad_args(world, tmp_path)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [MOSTLY_BAD_ERROR]
    assert not (tmp_path / "run" / "instruct" / "summary.json").exists()
    assert (tmp_path / "run" / "instruct" / "checkpoints" / "checkpoint-4").is_dir()  # the last good one stays


def test_two_processes_stop_at_the_same_step_with_the_same_counts(world, tmp_path):
    """Each rank sees only its half of every step's samples; the check sums the counts over ranks, so both ranks
    judge the same totals as one process would and stop at the same step, with the same line."""
    done = run_cli(_mostly_bad_args(world, tmp_path), nproc=2, timeout=300)
    assert done.returncode != 0
    # the two ranks write at the same moment, so their lines may share a line of the captured stream
    assert done.stderr.count("error: instruct: ") == 2 and done.stderr.count(MOSTLY_BAD_ERROR) == 2
    assert not (tmp_path / "run" / "instruct" / "summary.json").exists()


def test_zero_tolerance_stops_at_the_first_step_with_a_bad_image(world, tmp_path, damaged):
    root, _ = damaged
    cfg = _config(world, tmp_path, root, max_bad_fraction=0.0)
    with pytest.raises(UserError, match=r"^instruct: 2 of 4 samples seen \(50 %\) had a bad image .* at step 1;"):
        train_vlm(cfg, "instruct")


def test_on_bad_image_error_is_still_selectable(world, tmp_path, damaged):
    root, _ = damaged
    cfg = _config(world, tmp_path, root, on_bad_image="error")
    with pytest.raises(SampleError, match=r"^sample 'instruct-00(03|10)': image images/00(03|10).png: "):
        train_vlm(cfg, "instruct")
