"""The claims' verdicts (toy/claims.py) read the issue's targets from paired per-image differences: A needs a
>= 1 dB PSNR gain whose CI excludes 0 and lower centre/colour errors, B every step up in tokens, D >= 80 % edits as
asked and objects closer to the source than the edited caption. Synthetic per-image numbers, no models."""
import argparse

import numpy as np
import pytest

from toy.claims import claim_verdicts, claims_summary, paired_differences, claims_table

COUNTS = [1, 4, 16]
N = 64


def _arm(psnr, center=0.1, colour=50.0, seed=0):
    rng = np.random.default_rng(seed)
    return {"psnr": np.asarray(psnr, dtype=np.float64),
            "ssim": np.full(N, 0.5), "center_error": np.full(N, center) + 0.01 * rng.normal(size=N),
            "colour_error": np.full(N, colour) + rng.normal(size=N)}


def _per_image(gain_db=1.5, spread=0.2, steps=(0.3, 0.3), center=0.05, colour=30.0, seed=0):
    rng = np.random.default_rng(seed)
    base = 20 + rng.normal(size=N)
    one = base + gain_db + spread * rng.normal(size=N)
    four = one + steps[0] + 0.1 * rng.normal(size=N)
    sixteen = four + steps[1] + 0.1 * rng.normal(size=N)
    return {"caption_coarse": _arm(base, 0.1, 50.0, 1), "vilex_1": _arm(one, center, colour, 2),
            "vilex_4": _arm(four, seed=3), "vilex_16": _arm(sixteen, seed=4)}


def _rmse(closer_by=0.1, spread=0.02):
    """Paired RMSEs whose difference has mean exactly -closer_by and standard deviation about ``spread``."""
    caption = 0.4 + 0.05 * np.random.default_rng(5).normal(size=16)
    signs = np.resize([1.0, -1.0], 16)
    return {"tfg": caption - closer_by + spread * signs, "caption_edited": caption}


def _verdicts(per_image, rmse=None, as_asked=0.9):
    diffs = paired_differences(per_image, COUNTS, rmse or _rmse())
    return claim_verdicts(diffs, COUNTS, as_asked), diffs


def test_every_claim_holds_when_every_target_is_met():
    verdicts, diffs = _verdicts(_per_image())
    assert all(verdicts.values()), verdicts
    assert diffs["psnr_vilex_1_minus_caption_coarse"]["mean"] == pytest.approx(1.5, abs=0.1)


def test_claim_a_needs_a_gain_of_one_db_not_only_a_significant_one():
    verdicts, diffs = _verdicts(_per_image(gain_db=0.8, spread=0.05))
    assert diffs["psnr_vilex_1_minus_caption_coarse"]["mean"] - diffs["psnr_vilex_1_minus_caption_coarse"]["ci95"] > 0
    assert not verdicts["A_psnr_1token_beats_coarse_caption"]


def test_claim_a_fails_when_the_gain_is_large_but_its_ci_includes_zero():
    verdicts, diffs = _verdicts(_per_image(gain_db=1.2, spread=8.0))
    assert diffs["psnr_vilex_1_minus_caption_coarse"]["ci95"] > diffs["psnr_vilex_1_minus_caption_coarse"]["mean"]
    assert not verdicts["A_psnr_1token_beats_coarse_caption"]


def test_claim_a_needs_lower_centre_and_colour_errors_than_the_caption():
    verdicts, _ = _verdicts(_per_image(center=0.1, colour=70.0))  # same centre error, worse colour
    assert verdicts["A_psnr_1token_beats_coarse_caption"]
    assert not verdicts["A_center_error_1token_below_coarse_caption"]
    assert not verdicts["A_colour_error_1token_below_coarse_caption"]


def test_claim_b_needs_every_step_up_in_tokens():
    verdicts, diffs = _verdicts(_per_image(steps=(0.0, 0.5)))
    assert diffs["psnr_vilex_16_minus_vilex_4"]["mean"] > 0.4
    assert not verdicts["B_monotone_psnr"]


@pytest.mark.parametrize("as_asked, closer_by, spread, holds", [
    (0.75, 0.1, 0.02, (False, True)),   # below 80 % of edits read as asked
    (0.85, 0.1, 0.02, (True, True)),
    (0.85, 0.01, 0.3, (True, False)),   # closer on average, but the paired CI includes 0
    (0.85, -0.1, 0.02, (True, False)),  # the objects drift further than with the edited caption
])
def test_claim_d_reads_the_share_of_edits_and_the_paired_object_region_difference(as_asked, closer_by, spread, holds):
    verdicts, _ = _verdicts(_per_image(), _rmse(closer_by, spread), as_asked)
    assert (verdicts["D_background_changes_as_asked"], verdicts["D_objects_closer_to_source_than_caption"]) == holds


def test_the_summary_paragraph_says_what_each_claim_means_and_whether_it_holds():
    per_image = _per_image(steps=(0.0, 0.5))
    verdicts, diffs = _verdicts(per_image, as_asked=0.5)
    results = {"n": N, "token_counts": COUNTS, "tfg_scale": 1.25, "verdicts": verdicts, "paired_differences": diffs,
               "tfg": {"tfg": {"background_changed_as_asked": 0.5, "n": 16}}}
    text = claims_summary(results)
    assert "\n" not in text.strip()  # one paragraph
    assert "A **holds**" in text and "B **does not hold**" in text and "D **does not hold**" in text
    assert "1 dB" in text and "80%" in text and "50% of 16" in text and f"{N} held-out scenes" in text


def test_the_claims_table_lists_every_paired_difference_with_its_unit():
    verdicts, diffs = _verdicts(_per_image())
    arm = {"psnr": {"mean": 20.0, "ci95": 0.1}, "ssim": {"mean": 0.5, "ci95": 0.01},
           "center_error": {"mean": 0.1, "ci95": 0.01}, "colour_error": {"mean": 50.0, "ci95": 1.0},
           "attributes": {k: 0.5 for k in ("background_accuracy", "count_accuracy", "shape_accuracy",
                                           "colour_accuracy", "cell_accuracy")}}
    tfg_arm = {"background_changed_as_asked": 0.9, "largest_object_kept": 0.5,
               "object_region_rmse": {"mean": 0.3, "ci95": 0.05}, "n": 16}
    table = claims_table({"n": N, "tfg_scale": 1.25, "arms": {"vilex_1": arm}, "verdicts": verdicts,
                          "paired_differences": diffs, "tfg": {"tfg": tfg_arm, "caption_edited": tfg_arm}})
    assert "| PSNR (dB): vilex 1 minus caption coarse | +1.5" in table
    assert "| object-region RMSE (0-1): tfg minus caption edited | -0.1" in table
    assert "| B_monotone_psnr | yes |" in table


def test_the_demo_report_puts_lead_sections_under_the_title(tmp_path):
    from toy.demo.context import DemoContext

    ctx = DemoContext(out=tmp_path, options=argparse.Namespace(n=8, seed=3, size=32))
    ctx.add_section("## data")
    ctx.add_section("## short run")
    ctx.add_section("## shipped run claims", lead=True)
    text = ctx.write_report().read_text()
    assert text.index("## shipped run claims") < text.index("## data") < text.index("## short run")
