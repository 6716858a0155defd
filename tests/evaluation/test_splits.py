"""Splits carved from one labelled set: whole groups held out, every domain left out once; and the probe
command lines that use them on real AMi-Br patches of both scanners."""

from __future__ import annotations

import numpy as np
import pytest

from probes import fewshot, knn, linear
from ssl_path.core.errors import UserError, run_cli
from ssl_path.data.readers import read_spec
from ssl_path.evaluation.results import read_results
from ssl_path.evaluation.splits import domain_folds, group_ids, group_split, held_out_folds
from ssl_path.publish.card import evaluation_tables


def test_group_split_holds_out_whole_groups_stratified_and_seeded():
    rng = np.random.default_rng(0)
    groups = [f"slide{g}" for g in rng.integers(0, 40, 600)]
    labels = [int(g[5:]) % 3 for g in groups]  # every slide has one label
    train, test = group_split(labels, groups, 0.2, seed=1)
    assert not {groups[i] for i in train} & {groups[i] for i in test}
    assert sorted([*train, *test]) == list(range(600))
    assert 0.1 < len(test) / 600 < 0.3
    assert {labels[i] for i in test} == {0, 1, 2}  # stratified: every class is tested
    again, _ = group_split(labels, groups, 0.2, seed=1)
    other, _ = group_split(labels, groups, 0.2, seed=2)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_held_out_folds_come_as_near_the_share_asked_for_as_whole_folds_allow():
    # (k folds, m held out): m/k, not 1/round(1/fraction), which gave 0.5 for 0.4, 0.6, 0.8 and 0.9
    assert held_out_folds(0.2, 40) == (5, 1) and held_out_folds(0.5, 40) == (2, 1)
    assert held_out_folds(0.3, 40) == (10, 3) and held_out_folds(0.4, 40) == (5, 2)
    assert held_out_folds(0.8, 40) == (5, 4) and held_out_folds(0.9, 40) == (10, 9)
    assert held_out_folds(0.33, 88) == (3, 1)  # within a point: 29 of 88 one-slide folds would be worse
    assert held_out_folds(0.2, 3) == (3, 1) and held_out_folds(0.8, 3) == (2, 1)  # never more folds than groups
    # small sets: no folds of fewer than 4 groups, beyond one fold of about the share (3 of 10 folds
    # of 12 slides held out 50 % for 0.3, sklearn filling the first folds most)
    assert held_out_folds(0.3, 12) == (3, 1) and held_out_folds(0.35, 20) == (3, 1)


@pytest.mark.parametrize("fraction", [0.3, 0.4, 0.6, 0.8])
def test_group_split_holds_out_the_share_asked_for_in_stratified_whole_groups(fraction):
    groups = [f"slide{g}" for g in range(60) for _ in range(10)]  # 60 slides of 10 images
    labels = [int(g[5:]) % 3 for g in groups]  # 20 slides per class
    train, test = group_split(labels, groups, fraction, seed=0)
    assert len(test) / 600 == pytest.approx(fraction, abs=0.02)
    assert not {groups[i] for i in train} & {groups[i] for i in test}
    assert sorted([*train, *test]) == list(range(600))
    assert np.bincount(np.asarray(labels)[test]) / len(test) == pytest.approx([1 / 3] * 3, abs=0.05)


def test_group_split_of_a_small_real_cohort_stays_near_the_request(shared_data):
    """12 AMi-Br slides of 2 to 22 patches: folds of 1-2 slides (10 for 0.3) held out about 50 %."""
    data = read_spec(f"amibr:{shared_data / 'amibr_midog21'}")
    labels, groups = np.asarray(data.targets()), np.asarray([r.group for r in data.records])
    keep = np.isin(groups, sorted(set(groups))[:12])
    shares = [len(group_split(labels[keep], groups[keep], 0.3, seed)[1]) / keep.sum() for seed in range(10)]
    assert np.mean(shares) == pytest.approx(0.3, abs=0.05) and max(shares) < 0.4


def test_group_split_of_real_amibr_slides_follows_the_request(shared_data):
    data = read_spec(f"amibr:{shared_data / 'amibr_midog21'}")  # 1033 patches of 88 slides, 22.5 % atypical
    labels, groups = np.asarray(data.targets()), np.asarray([r.group for r in data.records])
    for fraction in (0.3, 0.8):  # they held out 33 % and 50 %
        train, test = group_split(labels, groups, fraction, seed=0)
        assert len(test) / len(labels) == pytest.approx(fraction, abs=0.015)
        assert labels[test].mean() == pytest.approx(labels.mean(), abs=0.01)
        assert not set(groups[train]) & set(groups[test])


def test_records_without_a_group_are_groups_of_their_own():
    assert group_ids(["a", None, "a", None]).tolist() == [0, 1, 0, 2]
    train, test = group_split([0, 1] * 10, [None] * 20, 0.5, seed=0)
    assert len(train) and len(test)
    with pytest.raises(UserError, match="at least 2 groups"):
        group_split([0, 1], ["a", "a"], 0.5, seed=0)
    with pytest.raises(UserError, match="strictly between 0 and 1"):
        group_split([0, 1], ["a", "b"], 1.0, seed=0)


def test_domain_folds_leave_each_domain_out_once():
    domains = ["xr", "s360", "xr", "cs2", "s360"]
    folds = domain_folds(domains)
    assert [name for name, _, _ in folds] == ["cs2", "s360", "xr"]
    for name, train, test in folds:
        assert all(domains[i] == name for i in test) and all(domains[i] != name for i in train)
        assert sorted([*train, *test]) == list(range(5))
    with pytest.raises(UserError, match="have no domain"):
        domain_folds(["xr", None])
    with pytest.raises(UserError, match="at least 2 domains"):
        domain_folds(["xr", "xr"])


@pytest.fixture(scope="module")
def both_scanners(sample_data) -> str:
    """22 patches: slides 005, 006, 036 (Hamamatsu XR: 3 + 6 + 6) and 066, 088 (Hamamatsu S360: 4 + 3),
    both classes in each scanner."""
    return f"amibr:{sample_data / 'amibr'}?group=005.tiff,006.tiff,036.tiff,066.tiff,088.tiff"


def _args(spec: str, tmp_path, *extra: str) -> list[str]:
    return [
        "--ckpt",
        "timm:vit_tiny_patch16_224",
        "--train",
        spec,
        "--input-size",
        "64",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
        *extra,
    ]


def test_knn_leave_one_scanner_out(both_scanners, tmp_path, capsys):
    out = tmp_path / "lodo.json"
    assert (
        run_cli(knn.main, _args(both_scanners, tmp_path, "--leave-one-domain-out", "--k", "5", "--out", str(out))) == 0
    )
    results = read_results(out)
    assert results["split"]["method"] == "leave-one-domain-out"
    folds = {f["domain"]: f for f in results["split"]["folds"]}
    assert folds["hamamatsu_s360"]["n_test"] == 7 and folds["hamamatsu_s360"]["n_train"] == 15
    assert folds["hamamatsu_xr"]["n_test"] == 15 and all(f["shared_groups"] == 0 for f in folds.values())
    assert {"hamamatsu_s360/k5", "hamamatsu_xr/uni_k20", "hamamatsu_xr/k5"} <= set(results["metrics"])
    assert results["metrics"]["hamamatsu_s360/k5"]["n"] == 7
    # no fold's counts stand for all: the set's total, and each fold's in the card
    dataset = results["dataset"]
    assert dataset["n_train"] is None and dataset["n_test"] is None and dataset["n_images"] == 22
    assert evaluation_tables([results])[0]["images"] == (
        "22 images; each fold holds out one domain and trains on the others (per fold, "
        "hamamatsu_s360: 15 training and 7 test images; hamamatsu_xr: 7 training and 15 test images)"
    )
    # the CI footnote counts each left-out scanner's own test slides (2 and 3), not the first fold's
    footer = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[95 % CI")]
    assert footer == [
        "[95 % CI: bootstrap, 1000 redraws of each test set's units, hamamatsu_s360: the 2 test groups "
        "(slides/patients); hamamatsu_xr: the 3 test groups (slides/patients)]"
    ]


def test_linear_split_by_group_never_shares_a_slide(both_scanners, tmp_path):
    out = tmp_path / "group.json"
    argv = _args(
        both_scanners, tmp_path, "--split-by", "group", "--test-fraction", "0.3", "--c-grid", "1", "--out", str(out)
    )
    assert run_cli(linear.main, argv) == 0
    results = read_results(out)
    split, row = results["split"], results["metrics"]["linear"]
    assert split["method"] == "group" and split["shared_groups"] == 0
    assert split["train_groups"] >= 1 and split["test_groups"] >= 1
    assert row["n"] < 22
    # the share asked for and the one whole slides gave (1 of 3 folds of the 5 slides), both named
    assert split["test_fraction"] == 0.3 and split["test_share"] == pytest.approx(row["n"] / 22)
    assert results["config"]["val_fraction"] == 0.2
    assert evaluation_tables([results])[0]["images"] == f"{22 - row['n']} training and {row['n']} test images"
    assert split["val_share"] == row["val_share"] == pytest.approx(row["n_val"] / (row["n_fit"] + row["n_val"]))


def test_fewshot_leave_one_scanner_out_draws_curves_per_scanner(both_scanners, tmp_path):
    out = tmp_path / "fewshot.json"
    argv = _args(
        both_scanners,
        tmp_path,
        "--leave-one-domain-out",
        "--fractions",
        "1.0",
        "--shots",
        "1",
        "--seeds",
        "2",
        "--episodes",
        "2",
        "--probes",
        "knn",
        "prototype",
        "--out",
        str(out),
    )
    assert run_cli(fewshot.main, argv) == 0
    results = read_results(out)
    assert results["seeds"] == [0, 1] and results["split"]["method"] == "leave-one-domain-out"
    assert {"hamamatsu_s360/shots_1/prototype", "hamamatsu_xr/fraction_1/knn"} <= set(results["metrics"])
    for scanner in ("hamamatsu_s360", "hamamatsu_xr"):
        assert (tmp_path / f"fewshot_curves_{scanner}.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--leave-one-domain-out", "--split-by", "group"], "give one"),
        (["--split-by", "group", "--test", "SPEC"], "nothing to carve"),
        ([], "--test SPEC is required"),
    ],
)
def test_split_options_that_contradict_fail_in_one_line(both_scanners, tmp_path, capsys, extra, words):
    extra = [both_scanners if e == "SPEC" else e for e in extra]
    assert run_cli(knn.main, _args(both_scanners, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
