"""Reconstruction metrics and `vilex eval-recon` (tables, JSON, FID only from local Inception weights, uncaptioned
folders, checkpoints by run / checkpoint-<step> folder)."""
import json
import math

import pytest
import torch

from vilex.cli.main import main
from vilex.metrics import frechet_distance, inception_score, mean_ci95, psnr, ssim


def test_psnr_ssim_values():
    a = torch.zeros(2, 3, 8, 8)
    b = a.clone()
    b[1] += 0.1  # mse 0.01 -> 20 dB
    p = psnr(a + 0.5, b + 0.5)
    assert p[1].item() == pytest.approx(20.0, abs=1e-4) and p[0] > 100
    s = ssim(a + 0.5, a + 0.5)
    assert torch.allclose(s, torch.ones(2), atol=1e-6)
    noisy = (a + 0.5 + 0.2 * torch.randn_like(a)).clamp(0, 1)
    assert (ssim(a + 0.5, noisy) < 0.9).all()


def test_fid_and_is_basic_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(x, x + 1.0) == pytest.approx(4.0, rel=0.05)  # mean shift of 1 in 4 dims
    uniform = torch.zeros(10, 5)
    assert inception_score(uniform) == pytest.approx(1.0)
    confident = torch.eye(5).repeat(2, 1) * 50
    assert inception_score(confident) == pytest.approx(5.0, rel=1e-3)
    m, ci = mean_ci95(torch.tensor([1.0, 3.0]))
    assert m == 2.0 and ci == pytest.approx(1.96 * math.sqrt(2) / math.sqrt(2))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from vilex.models import ViLexModel
    from vilex.models.tiny import build_tiny_pixel_decoder, tiny_vilex_config
    from toy.scenes.generate import generate_dataset

    root = tmp_path_factory.mktemp("recon")
    decoder = build_tiny_pixel_decoder(root / "decoder", image_size=16)
    model = ViLexModel.from_config(tiny_vilex_config(decoder, decoder_type="pixel_unet"))
    model.save_pretrained(root / "ckpt")
    generate_dataset(root / "data", n=40, seed=1, size=16, progress=False)
    return root


def test_eval_recon_cli_writes_tables(tiny_ckpt, tmp_path, capsys):
    rc = main(["eval-recon", "--checkpoint", str(tiny_ckpt / "ckpt"), "--data", str(tiny_ckpt / "data" / "val"),
               "--num-tokens", "1", "4", "--num-images", "4", "--steps", "2", "--out", str(tmp_path)])
    assert rc == 0
    table = json.loads((tmp_path / "recon_table.json").read_text())
    assert [r["arm"] for r in table["rows"]] == ["caption", "vilex_1", "vilex_4"]
    assert all(r["n"] == 4 and 0 < r["psnr"] < 60 and -1 <= r["ssim"] <= 1 for r in table["rows"])
    assert table["notes"] == ["FID/IS not computed: no local Inception-v3 weights given (--inception-weights PATH); "
                              "nothing is downloaded."]
    md = (tmp_path / "recon_table.md").read_text()
    assert "| ViLex, 4 token(s) |" in md and "| caption (text → image) |" in md
    assert (tmp_path / "recon_examples.png").stat().st_size > 0
    assert "PSNR" in capsys.readouterr().out


def test_eval_recon_bad_inputs(tiny_ckpt, tmp_path, capsys):
    rc = main(["eval-recon", "--checkpoint", str(tiny_ckpt / "ckpt"), "--data", str(tiny_ckpt / "data" / "val"),
               "--num-tokens", "99", "--num-images", "4", "--steps", "1", "--out", str(tmp_path)])
    assert rc == 2 and "num_tokens=99 is out of range" in capsys.readouterr().err
    rc = main(["eval-recon", "--checkpoint", str(tiny_ckpt / "ckpt"), "--data", str(tiny_ckpt / "data" / "val"),
               "--num-images", "4", "--steps", "1", "--out", str(tmp_path), "--inception-weights", "/nope.pt"])
    assert rc == 2 and "Inception weights not found: /nope.pt" in capsys.readouterr().err
    rc = main(["eval-recon", "--checkpoint", str(tiny_ckpt / "ckpt"), "--data", str(tiny_ckpt / "data" / "val"),
               "--baseline", "caption", "clip", "--num-images", "4", "--out", str(tmp_path)])
    assert rc == 2 and capsys.readouterr().err.strip() == "error: unknown baseline 'clip' (known: caption)"
    rc = main(["eval-recon", "--checkpoint", str(tiny_ckpt / "data"), "--data", str(tiny_ckpt / "data" / "val"),
               "--num-images", "4", "--out", str(tmp_path)])
    assert rc == 2 and capsys.readouterr().err.strip().startswith(
        f"error: {tiny_ckpt / 'data'} is not a ViLex checkpoint: expected a folder with vilex_config.json")


def test_eval_recon_on_an_uncaptioned_folder_of_jpegs_from_a_run_checkpoint(tiny_ckpt, tmp_path, capsys):
    """A folder of JPEGs and nothing else, and a `vilex pretrain` checkpoint-<step> folder: the caption baseline is
    skipped with a note, the ViLex rows are exactly those of the captioned run on the same pixels."""
    import shutil

    from PIL import Image

    jpegs = tmp_path / "jpegs"
    jpegs.mkdir()
    for i, png in enumerate(sorted((tiny_ckpt / "data" / "val" / "images").glob("*.png"))[:4]):
        Image.open(png).convert("RGB").save(jpegs / f"img{i}.jpg", quality=95)
    step = tmp_path / "run" / "checkpoints" / "checkpoint-120"
    shutil.copytree(tiny_ckpt / "ckpt", step / "pipeline")
    common = ["--num-tokens", "1", "--num-images", "4", "--steps", "1", "--device", "cpu"]
    assert main(["eval-recon", "--checkpoint", str(step), "--data", str(jpegs), "--out", str(tmp_path / "a"),
                 *common]) == 0
    table = json.loads((tmp_path / "a" / "recon_table.json").read_text())
    assert [r["arm"] for r in table["rows"]] == ["vilex_1"] and table["rows"][0]["n"] == 4
    note = "Caption baseline skipped: 4 of 4 images have no 'caption' field (captions come from the data's metadata; " \
           "--caption-field names another field)."
    assert table["notes"][0] == note
    assert note in (tmp_path / "a" / "recon_table.md").read_text() and note in capsys.readouterr().out
    # the run folder means the same (its latest) checkpoint; --baseline alone asks for no baseline and adds no note
    assert main(["eval-recon", "--checkpoint", str(tmp_path / "run"), "--data", str(jpegs), "--out",
                 str(tmp_path / "b"), "--baseline", *common]) == 0
    again = json.loads((tmp_path / "b" / "recon_table.json").read_text())
    assert again["rows"] == table["rows"] and not any("Caption" in n for n in again["notes"])


@pytest.mark.slow
def test_eval_recon_fid_with_local_inception(tiny_ckpt, tmp_path):
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(net.state_dict(), tmp_path / "inception.pt")
    rc = main(["eval-recon", "--checkpoint", str(tiny_ckpt / "ckpt"), "--data", str(tiny_ckpt / "data" / "val"),
               "--num-tokens", "1", "--num-images", "4", "--steps", "1", "--out", str(tmp_path / "out"),
               "--inception-weights", str(tmp_path / "inception.pt")])
    assert rc == 0
    rows = json.loads((tmp_path / "out" / "recon_table.json").read_text())["rows"]
    assert all(math.isfinite(r["fid"]) and r["fid"] >= -1e-6 and r["is"] >= 1.0 - 1e-6 for r in rows), rows
