"""factlab.continual.metrics: every expectation below is computed by hand (arithmetic in the
comments), so an off-by-one in a range or a miscounted label changes a number."""

import json
import math

import numpy as np
import pytest

from factlab.continual import metrics as M
from factlab.errors import FactlabError

# ----------------------------------------------------------------------------- matrix

# T = 3. Experience 1's accuracy RISES after it was learned (0.6 -> 0.9) and then falls (0.5):
# Chaudhry's forgetting measures from the peak (0.9), BWT from the diagonal (0.6).
# R[0, 2] and R[1, 2] are high, so a max that starts before row j changes the answer; and
# R[3, 2] > R[2, 2], so a max that includes row T changes it too.
R3 = [
    [0.9, 0.0, 0.5, 0.0],
    [0.8, 0.6, 0.7, 0.1],
    [0.7, 0.9, 0.4, 0.3],
    [0.6, 0.5, 0.45, 0.8],
]


def test_average_accuracy():
    # A_3 = (R[3,1] + R[3,2] + R[3,3]) / 3 = (0.5 + 0.45 + 0.8) / 3 = 1.75 / 3
    assert M.average_accuracy(R3) == pytest.approx(1.75 / 3)
    # with the base column: (0.6 + 1.75) / 4 = 0.5875
    assert M.average_accuracy(R3, include_base=True) == pytest.approx(0.5875)


def test_average_incremental_accuracy():
    # A_1 = R[1,1] = 0.6; A_2 = (0.9 + 0.4) / 2 = 0.65; A_3 = 1.75 / 3
    # mean = (0.6 + 0.65 + 0.583333) / 3 = 0.611111 (a version with the base column differs)
    assert M.average_incremental_accuracy(R3) == pytest.approx((0.6 + 0.65 + 1.75 / 3) / 3)


def test_learning_accuracy():
    # (R[1,1] + R[2,2] + R[3,3]) / 3 = (0.6 + 0.4 + 0.8) / 3 = 0.6; with R[0,0] it would be 0.675
    assert M.learning_accuracy(R3) == pytest.approx(0.6)


def test_forgetting_chaudhry_range():
    # j = 1: max(R[1,1], R[2,1]) - R[3,1] = max(0.6, 0.9) - 0.5 = 0.4
    # j = 2: max(R[2,2]) - R[3,2] = 0.4 - 0.45 = -0.05
    # mean = 0.35 / 2 = 0.175.
    # (Max including row T: j=2 term 0 -> 0.2; starting at row 0 or row j-1: j=2 term 0.25
    # -> 0.325; including j = T: a third term. All differ.)
    assert M.forgetting(R3) == pytest.approx(0.175)


def test_bwt_excludes_last_column():
    # j = 1: R[3,1] - R[1,1] = 0.5 - 0.6 = -0.1; j = 2: R[3,2] - R[2,2] = 0.45 - 0.4 = 0.05
    # mean = -0.05 / 2 = -0.025 (with j = 3's zero term it would be -0.0167)
    assert M.bwt(R3) == pytest.approx(-0.025)
    # forgetting and -BWT differ here: 0.175 vs 0.025 (the rise after learning)
    assert M.forgetting(R3) != pytest.approx(-M.bwt(R3))


def test_fwt():
    # j = 2: R[1,2] - R[0,2] = 0.7 - 0.5 = 0.2; j = 3: R[2,3] - R[0,3] = 0.3 - 0.0 = 0.3
    # mean = 0.25 (a j = 1 term would add R[0,1] - R[0,1] = 0 -> 0.1667)
    assert M.fwt(R3) == pytest.approx(0.25)


def test_base_forgetting_includes_row_0():
    # max(R[0,0], R[1,0], R[2,0]) - R[3,0] = max(0.9, 0.8, 0.7) - 0.6 = 0.3 (without row 0: 0.2)
    assert M.base_forgetting(R3) == pytest.approx(0.3)


def test_forgetting_equals_minus_bwt_when_monotone():
    # accuracy only falls after learning, so the peak is the diagonal
    m = [
        [0.9, 0.0, 0.0, 0.0],
        [0.8, 1.0, 0.0, 0.0],
        [0.7, 0.8, 0.9, 0.0],
        [0.6, 0.5, 0.6, 0.7],
    ]
    # forgetting: j=1: max(1.0, 0.8) - 0.5 = 0.5; j=2: 0.9 - 0.6 = 0.3 -> 0.4
    # bwt: (0.5 - 1.0 + 0.6 - 0.9) / 2 = -0.4
    assert M.forgetting(m) == pytest.approx(0.4)
    assert M.bwt(m) == pytest.approx(-0.4)


def test_t1_undefined_metrics_are_none():
    m = [[0.9, 0.0], [0.7, 0.8]]
    assert M.forgetting(m) is None and M.bwt(m) is None and M.fwt(m) is None
    assert M.base_forgetting(m) == pytest.approx(0.2)  # 0.9 - 0.7
    assert M.average_accuracy(m) == pytest.approx(0.8)
    assert M.average_incremental_accuracy(m) == pytest.approx(0.8)
    assert M.learning_accuracy(m) == pytest.approx(0.8)
    s = M.matrix_summary(m)
    assert s["T"] == 1 and s["forgetting"] is None and s["bwt"] is None


def test_nan_terms_are_skipped():
    # Policy: NaN entries are skipped (nanmean over the defined terms; NaN inside a max is
    # skipped); None when no term is defined.
    r = np.array(R3, dtype=float)
    r[2, 1] = np.nan
    # forgetting j=1: max(0.6, nan) - 0.5 = 0.1; j=2: -0.05 -> 0.025
    assert M.forgetting(r) == pytest.approx(0.025)
    assert M.bwt(r) == pytest.approx(-0.025)  # does not use R[2,1]
    # A_2 = nanmean(nan, 0.4) = 0.4 -> (0.6 + 0.4 + 1.75/3) / 3
    assert M.average_incremental_accuracy(r) == pytest.approx((0.6 + 0.4 + 1.75 / 3) / 3)
    r[3, 1] = np.nan
    # the j=1 terms need R[3,1]: dropped. forgetting = -0.05, bwt = 0.05, A_3 = (0.45+0.8)/2
    assert M.forgetting(r) == pytest.approx(-0.05)
    assert M.bwt(r) == pytest.approx(0.05)
    assert M.average_accuracy(r) == pytest.approx(0.625)
    # None entries (as in summary's JSON matrices) read as NaN
    assert M.bwt(r.tolist()) == pytest.approx(0.05)
    assert M.bwt([[None if math.isnan(x) else x for x in row] for row in r.tolist()]) \
        == pytest.approx(0.05)
    s = M.matrix_summary(np.full((3, 3), np.nan))
    assert s["T"] == 2
    assert all(v is None for k, v in s.items() if k != "T")


def test_matrix_summary_keys_and_types():
    s = M.matrix_summary(R3)
    assert s["T"] == 3
    assert s["forgetting"] == pytest.approx(0.175) and s["bwt"] == pytest.approx(-0.025)
    assert s["fwt"] == pytest.approx(0.25) and s["base_forgetting"] == pytest.approx(0.3)
    assert s["average_accuracy_with_base"] == pytest.approx(0.5875)
    assert all(type(v) in (float, int) for v in s.values())


@pytest.mark.parametrize("bad", [
    [0.5, 0.5],  # 1-D
    [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]],  # not square
    [[0.5]],  # T = 0
    np.zeros((2, 2, 2)),  # 3-D
    [[0.5, 1.5], [0.5, 0.5]],  # outside [0, 1]
    [["a", 0.5], [0.5, 0.5]],  # not numeric
    [[0.5, 0.5], [0.5]],  # ragged
])
def test_matrix_shape_errors(bad):
    with pytest.raises(FactlabError):
        M.matrix_summary(bad)
    with pytest.raises(FactlabError):
        M.forgetting(bad)


# ----------------------------------------------------------------------------- records


def rec(person, attribute, label, experience, split, answer, prediction, stale=None,
        logprob=None, **extra):
    return {"person": person, "attribute": attribute, "question": f"{attribute} of {person}?",
            "answer": answer, "prediction": prediction, "label": label,
            "experience": experience, "split": split, "stale": stale, "logprob": logprob,
            **extra}


# The questions, T = 2:
#   A p0 city invariant exp0 train gold Paris
#   B p1 city invariant exp0 test  gold Oslo
#   C p2 city updated   exp1 train gold Rome   (stale Lima)
#   D p4 job  new       exp1 train gold cook
#   E p5 job  new       exp2 test  gold baker
#   F p7 city unknown   exp-1      gold Kyiv   (always "right": chance; must never count)
#   G p6 city unknown   exp-1      gold Lima
def world_rows():
    def row(a, b, c, d, e, f, g, lp=(None,) * 7, flag=None):
        extra = {} if flag is None else {"correct": flag}
        return [
            rec(0, "city", "invariant", 0, "train", "Paris", a, logprob=lp[0], **extra),
            rec(1, "city", "invariant", 0, "test", "Oslo", b, logprob=lp[1]),
            rec(2, "city", "updated", 1, "train", "Rome", c, stale="Lima", logprob=lp[2]),
            rec(4, "job", "new", 1, "train", "cook", d, logprob=lp[3]),
            rec(5, "job", "new", 2, "test", "baker", e, logprob=lp[4]),
            rec(7, "city", "unknown", -1, "unknown", "Kyiv", f, logprob=lp[5]),
            rec(6, "city", "unknown", -1, "unknown", "Lima", g, logprob=lp[6]),
        ]
    #            A         B        C        D         E         F        G
    r0 = row(" Paris", " Oslo", " Lima", " baker", " cook", " Kyiv", " Oslo")
    r1 = row(" Paris", " Rome", " Rome", " cook", " cook", " Kyiv", " Oslo")
    # A is wrong at T but carries a lying stored flag correct=True
    r2 = row(" Oslo", " Oslo", " Lima", " cook", " baker", " Kyiv", " Oslo",
             lp=(-0.5, -1.0, -0.2, -0.1, -0.3, -0.4, -3.0), flag=True)
    return {0: r0, 1: r1, 2: r2}


def test_correct_recomputes_and_ignores_flag():
    rows = world_rows()
    # row 2: A " Oslo" != " Paris" (its flag says True), B right, C stale, D right, E right,
    # F right, G wrong
    assert M.correct(rows[2]).tolist() == [False, True, False, True, True, True, False]
    # an answer without the leading space is not the completion form
    assert M.correct([rec(0, "city", "new", 1, "train", "Paris", "Paris")]).tolist() == [False]
    assert M.correct([]).dtype == bool


def test_is_stale():
    rows = world_rows()
    # only C has a stale value; " Lima" == completion("Lima") at rows 0 and 2, " Rome" at 1.
    # G predicts " Oslo" with stale None: False
    assert M.is_stale(rows[0]).tolist() == [False, False, True, False, False, False, False]
    assert M.is_stale(rows[1]).tolist() == [False] * 7
    assert M.is_stale(rows[2]).tolist() == [False, False, True, False, False, False, False]


def test_r_matrix_all_splits():
    R = M.r_matrix(world_rows(), 2)
    # col 0 = A, B: row0 2/2; row1 A right, B wrong = 1/2; row2 A wrong (flag lies), B right = 1/2
    # col 1 = C, D: row0 0/2; row1 2/2; row2 C stale, D right = 1/2
    # col 2 = E:    row0 0;   row1 0;   row2 1
    # (counting the unknown F, experience -1, as column -1 = 2 would give R[0,2] = 1/2;
    #  trusting A's flag would give R[2,0] = 1)
    expected = [[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.5, 0.5, 1.0]]
    np.testing.assert_allclose(R, expected)
    assert R.shape == (3, 3)


def test_r_matrix_by_split_and_missing_rows():
    rows = world_rows()
    nan = np.nan
    # train (ID) = A, C, D. col0 = A: 1, 1, 0; col1 = C, D: 0, 1, 1/2; col2: no record
    np.testing.assert_allclose(M.r_matrix(rows, 2, split="train"),
                               [[1, 0, nan], [1, 1, nan], [0, 0.5, nan]])
    # test (OOD) = B, E. col0 = B: 1, 0, 1; col1: no record; col2 = E: 0, 0, 1
    np.testing.assert_allclose(M.r_matrix(rows, 2, split="test"),
                               [[1, nan, 0], [0, nan, 0], [1, nan, 1]])
    # a row not given is a NaN row
    np.testing.assert_allclose(M.r_matrix({0: rows[0], 2: rows[2]}, 2),
                               [[1, 0, 0], [nan, nan, nan], [0.5, 0.5, 1]])
    # a list is indexed by t
    np.testing.assert_allclose(M.r_matrix([rows[0], rows[1], rows[2]], 2),
                               M.r_matrix(rows, 2))
    # the rows' order does not matter: records are matched by their question
    shuffled = dict(rows)
    shuffled[2] = rows[2][::-1]
    np.testing.assert_allclose(M.r_matrix(shuffled, 2), M.r_matrix(rows, 2))


def test_r_matrix_feeds_matrix_summary():
    s = M.matrix_summary(M.r_matrix(world_rows(), 2))
    # R = [[1,0,0],[.5,1,0],[.5,.5,1]]: A_2 = (0.5 + 1)/2 = 0.75; forgetting = 1 - 0.5 = 0.5;
    # bwt = 0.5 - 1 = -0.5; fwt = R[1,2] - R[0,2] = 0; base = max(1, .5) - .5 = 0.5;
    # learning = (1 + 1)/2 = 1; AIA = (1 + 0.75)/2 = 0.875
    assert s["average_accuracy"] == pytest.approx(0.75)
    assert s["forgetting"] == pytest.approx(0.5)
    assert s["bwt"] == pytest.approx(-0.5)
    assert s["fwt"] == pytest.approx(0.0)
    assert s["base_forgetting"] == pytest.approx(0.5)
    assert s["learning_accuracy"] == pytest.approx(1.0)
    assert s["average_incremental_accuracy"] == pytest.approx(0.875)


def test_mismatched_rows_raise_naming_the_record():
    rows = world_rows()
    bad = dict(rows)
    bad[1] = rows[1][:3] + rows[1][4:]  # D (person 4) missing
    with pytest.raises(FactlabError, match=r"rows\[1\].*person 4.*'job'.*missing"):
        M.r_matrix(bad, 2)
    bad = dict(rows)
    bad[2] = rows[2] + [rec(9, "city", "new", 2, "train", "Rome", " Rome")]
    with pytest.raises(FactlabError, match=r"rows\[2\].*person 9"):
        M.ckl(bad, 2)
    bad = dict(rows)
    bad[1] = [dict(r) for r in rows[1]]
    bad[1][1]["label"] = "updated"  # B changes label
    with pytest.raises(FactlabError, match=r"person 1"):
        M.summary(bad, 2)


def test_record_errors():
    rows = world_rows()
    bad = {0: [dict(r) for r in rows[0]]}
    bad[0][0]["label"] = "forgotten"
    with pytest.raises(FactlabError, match="unknown label 'forgotten'"):
        M.r_matrix(bad, 2)
    bad = {0: [dict(r) for r in rows[0]]}
    bad[0][0]["experience"] = 3  # T = 2
    with pytest.raises(FactlabError, match="experience 3"):
        M.r_matrix(bad, 2)
    with pytest.raises(FactlabError, match="row 3"):
        M.r_matrix({3: rows[0]}, 2)
    with pytest.raises(FactlabError, match="split"):
        M.r_matrix(rows, 2, split="ood")
    with pytest.raises(FactlabError):
        M.r_matrix({}, 2)
    with pytest.raises(FactlabError):
        M.r_matrix(rows, 0)
    with pytest.raises(FactlabError, match="prediction"):
        M.correct([{"answer": "Paris"}])


def test_ckl():
    c = M.ckl(world_rows(), 2)
    # invariant A, B: right/right at 0 -> before 1.0; at 2 A wrong, B right -> 0.5
    assert c["invariant_before"] == pytest.approx(1.0)
    assert c["invariant_retention"] == pytest.approx(0.5)
    # updated C: " Lima" (old value) at 0 and at 2: success 0, stale 1 and stale_before 1
    assert c["update_success"] == pytest.approx(0.0)
    assert c["stale_rate"] == pytest.approx(1.0)
    assert c["stale_before"] == pytest.approx(1.0)
    # new D, E: both right at 2 -> 1.0; both wrong at 0 -> acquired 2
    assert c["new_acquisition"] == pytest.approx(1.0)
    # forgotten: A (right at 0, wrong at 2) = 1; B was wrong at row 1 only: not forgotten
    assert (c["forgotten"], c["updated"], c["acquired"]) == (1, 0, 2)
    assert c["fuar"] == pytest.approx(0.5)  # 1 / (0 + 2)
    assert c["fuar_note"] is None
    assert (c["n_invariant"], c["n_updated"], c["n_new"], c["n_unknown"]) == (2, 1, 2, 2)


def test_ckl_fuar_zero_denominator():
    # Besides the one invariant record under test, records that must NOT count:
    # an invariant wrong at 0 and at T (not forgotten: it was never known), an update and a
    # new fact already right at 0 (not updated / acquired: nothing changed).
    same = [rec(1, "city", "invariant", 0, "train", "Oslo", " Rome"),
            rec(3, "city", "updated", 1, "train", "Kyiv", " Kyiv", stale="Lima"),
            rec(5, "job", "new", 1, "train", "baker", " baker")]

    def rows(a_at_T):
        r0 = [rec(0, "city", "invariant", 0, "train", "Paris", " Paris"),
              rec(2, "city", "updated", 1, "train", "Rome", " Lima", stale="Lima"),
              rec(4, "job", "new", 1, "train", "cook", " baker")] + same
        rT = [rec(0, "city", "invariant", 0, "train", "Paris", a_at_T),
              rec(2, "city", "updated", 1, "train", "Rome", " Lima", stale="Lima"),
              rec(4, "job", "new", 1, "train", "cook", " baker")] + same
        return {0: r0, 1: rT}

    c = M.ckl(rows(" Oslo"), 1)  # 1 forgotten, nothing updated or acquired
    assert c["forgotten"] == 1 and c["updated"] == 0 and c["acquired"] == 0
    assert c["fuar"] is None
    assert c["fuar_note"].startswith("undefined: nothing updated or acquired")
    assert "1 forgotten" in c["fuar_note"]
    # rates still count every record: update success 1/2 (Kyiv), stale 1/2 (Lima)
    assert c["update_success"] == pytest.approx(0.5) and c["stale_rate"] == pytest.approx(0.5)
    c = M.ckl(rows(" Paris"), 1)  # nothing at all
    assert c["fuar"] is None and "nothing forgotten" in c["fuar_note"]
    with pytest.raises(FactlabError, match=r"rows\[1\]"):
        M.ckl({0: rows(" Paris")[0]}, 1)  # row T missing


# ----------------------------------------------------------------------------- hallucination


def brute_auroc(pos, neg):
    s = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return s / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_brute_force_with_ties(seed):
    g = np.random.default_rng(seed)
    pos = g.integers(0, 6, size=37).astype(float)  # few distinct values: many ties
    neg = (g.integers(0, 6, size=23) - 1).astype(float)
    assert M.auroc(pos, neg) == pytest.approx(brute_auroc(pos, neg), abs=1e-12)
    cont_pos, cont_neg = g.normal(0.3, 1, 50), g.normal(0, 1, 41)
    assert M.auroc(cont_pos, cont_neg) == pytest.approx(brute_auroc(cont_pos, cont_neg), abs=1e-12)


def test_auroc_edges():
    assert M.auroc([1, 2, 3], [0, 2]) == pytest.approx(0.75)  # (1+0 + 1+.5 + 1+1) / 6
    assert M.auroc([5, 6], [1, 2, 3]) == 1.0
    assert M.auroc([1, 2], [5, 6, 7]) == 0.0
    assert M.auroc([2, 2], [2]) == 0.5
    assert M.auroc([], [1]) is None and M.auroc([1], []) is None
    assert type(M.auroc([1], [0])) is float
    with pytest.raises(FactlabError):
        M.auroc([float("nan")], [0])


def test_choose_threshold():
    # separable: every tau in (0.5, 0.6] is perfect; the candidates come from the scores -> 0.6
    assert M.choose_threshold([0.6, 0.9, 0.8], [0.1, 0.3, 0.5]) == 0.6
    # known [0.6, 0.9], unknown [0.1, 0.7]; balanced accuracy of "score >= tau":
    #   tau 0.1: TPR 1,  TNR 0   -> 0.5
    #   tau 0.6: TPR 1,  TNR 1/2 -> 0.75
    #   tau 0.7: TPR 1/2, TNR 1/2 -> 0.5
    #   tau 0.9: TPR 1/2, TNR 1  -> 0.75
    # tie between 0.6 and 0.9: the smallest, 0.6
    assert M.choose_threshold([0.6, 0.9], [0.1, 0.7]) == 0.6
    # exact tie comparison with awkward counts: known [3, 1, 1], unknown [2]*3 + [0]*4
    #   tau 0: TPR 1, TNR 0 -> 1/2; tau 1: TPR 1, TNR 4/7 -> 11/14; tau 2: TPR 1/3, TNR 4/7;
    #   tau 3: TPR 1/3, TNR 1 -> 2/3. Best: 1
    assert M.choose_threshold([3, 1, 1], [2, 2, 2, 0, 0, 0, 0]) == 1.0
    assert type(M.choose_threshold([1], [0])) is float
    with pytest.raises(FactlabError):
        M.choose_threshold([], [0.1])


def test_confident_rate():
    assert M.confident_rate([0.1, 0.5, 0.5, 0.9], 0.5) == pytest.approx(0.75)  # >= inclusive
    assert M.confident_rate([], 0.5) is None


def test_hallucination():
    k = lambda p, lp: rec(p, "city", "invariant", 0, "train", "X", " Y", logprob=lp)  # noqa: E731
    u = lambda p, lp: rec(p, "city", "unknown", -1, "unknown", "X", " Y", logprob=lp)  # noqa: E731
    # validation: known [-0.5, -0.2], unknown [-3, -0.9] -> tau = -0.5 (the smallest perfect)
    # test: known [-1.0, -0.3, -0.4], unknown [-0.45, -2]
    #   confident_known = (-0.3, -0.4) = 2/3; confident_unknown = (-0.45) = 1/2
    #   auroc: -1 vs (-0.45, -2): 0 + 1; -0.3: 1 + 1; -0.4: 1 + 1 -> 5/6
    h = M.hallucination([k(0, -0.5), k(2, -0.2)], [u(4, -3.0), u(6, -0.9)],
                        [k(1, -1.0), k(3, -0.3), k(5, -0.4)], [u(7, -0.45), u(9, -2.0)])
    assert h["threshold"] == -0.5
    assert h["confident_known_rate"] == pytest.approx(2 / 3)
    assert h["confident_unknown_rate"] == pytest.approx(0.5)
    assert h["auroc"] == pytest.approx(5 / 6)
    with pytest.raises(FactlabError, match="logprob"):
        M.hallucination([k(0, None)], [u(4, -3.0)], [k(1, -1.0)], [u(7, -1.0)])
    with pytest.raises(FactlabError, match="label"):  # a known record on the unknown side
        M.hallucination([k(0, -1.0)], [k(4, -3.0)], [k(1, -1.0)], [u(7, -1.0)])


def test_contamination_three_people():
    # one attribute; people 0: Paris, 1: Oslo, 2: Paris. The map also records that person 1
    # held Lima (e.g. before an update): a value held only by the record's own person.
    values = {"city": {"Paris": {0, 2}, "Oslo": {1}, "Lima": {1}}}
    pool = {"city": ["Paris", "Oslo", "Rome", "Lima", "Kyiv"]}
    records = [
        rec(0, "city", "invariant", 0, "train", "Paris", " Paris"),  # right: not counted
        rec(1, "city", "invariant", 0, "train", "Oslo", " Paris"),  # wrong, Paris: 0, 2 -> yes
        rec(2, "city", "invariant", 0, "train", "Paris", " Rome"),  # wrong, nobody's -> no
        rec(0, "city", "invariant", 0, "train", "Paris", ""),  # empty: not counted
        rec(2, "city", "invariant", 0, "train", "Paris", " Oslo"),  # wrong, Oslo: 1 -> yes
        rec(1, "city", "invariant", 0, "train", "Oslo", " Lima"),  # wrong, Lima: only 1 -> no
    ]
    c = M.contamination(records, values, pool)
    # n_wrong = 4, contaminated 2 -> 0.5
    assert (c["n_wrong"], c["n_contaminated"]) == (4, 2)
    assert c["rate"] == pytest.approx(0.5)
    # chance per wrong answer, over the pool minus the gold, held by another person:
    #   p1 gold Oslo: {Paris, Rome, Lima, Kyiv}: Paris -> 1/4   (Lima is p1's own)
    #   p2 gold Paris: {Oslo, Rome, Lima, Kyiv}: Oslo, Lima -> 2/4   (twice)
    #   p1 gold Oslo: 1/4
    # mean = (1/4 + 2/4 + 2/4 + 1/4) / 4 = 0.375
    assert c["chance"] == pytest.approx(0.375)
    assert M.contamination(records, values)["chance"] is None
    assert M.contamination(records[:1], values, pool) == {
        "rate": None, "chance": None, "n_wrong": 0, "n_contaminated": 0}
    with pytest.raises(FactlabError, match="'job'"):
        M.contamination([rec(0, "job", "new", 1, "train", "cook", " baker")], values, pool)


# ----------------------------------------------------------------------------- summary


def _plain(x):
    """Only JSON's own python types, all the way down."""
    if isinstance(x, dict):
        return all(type(k) is str and _plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_plain(v) for v in x)
    return x is None or type(x) in (bool, int, float, str)


def test_summary():
    values = {"city": {"Paris": {0}, "Oslo": {1}, "Rome": {2}}, "job": {"cook": {4}, "baker": {5}}}
    pool = {"city": ["Paris", "Oslo", "Rome", "Lima", "Kyiv"], "job": ["cook", "baker"]}
    s = M.summary(world_rows(), 2, values, pool)
    json.dumps(s, allow_nan=False)
    assert _plain(s)
    assert s["T"] == 2
    assert s["matrix"] == [[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.5, 0.5, 1.0]]
    assert s["matrix_id"] == [[1.0, 0.0, None], [1.0, 1.0, None], [0.0, 0.5, None]]
    assert s["matrix_ood"] == [[1.0, None, 0.0], [0.0, None, 0.0], [1.0, None, 1.0]]
    assert s["matrix_summary"]["bwt"] == pytest.approx(-0.5)
    # ID: bwt = R[2,1] - R[1,1] = 0.5 - 1 = -0.5; base forgetting = max(1, 1) - 0 = 1
    assert s["matrix_summary_id"]["base_forgetting"] == pytest.approx(1.0)
    # OOD: column 1 unmeasured -> bwt, forgetting None; fwt = R[1,2] - R[0,2] = 0
    assert s["matrix_summary_ood"]["bwt"] is None
    assert s["matrix_summary_ood"]["fwt"] == pytest.approx(0.0)
    assert s["ckl"]["fuar"] == pytest.approx(0.5)
    # hallucination on row 2, even ids = validation: known A(-0.5) C(-0.2) D(-0.1),
    # unknown G p6 (-3.0) -> tau = -0.5 (TPR 1, TNR 1). Odd ids = test: known B(-1.0) E(-0.3),
    # unknown F p7 (-0.4): confident known 1/2, unknown 1/1; auroc (0 + 1) / 2 = 0.5.
    # (odd ids as validation would choose tau = -0.3)
    h = s["hallucination"]
    assert h["threshold"] == -0.5
    assert h["confident_known_rate"] == pytest.approx(0.5)
    assert h["confident_unknown_rate"] == pytest.approx(1.0)
    assert h["auroc"] == pytest.approx(0.5)
    assert s["hallucination_note"] is None
    # contamination over row 2's known-label wrong answers: A " Oslo" (p1's) -> yes;
    # C " Lima" (its own old value, nobody's now) -> no. Unknown G " Oslo" is left out.
    # chance: A gold Paris {Oslo, Rome, Lima, Kyiv} -> Oslo, Rome = 2/4;
    #         C gold Rome {Paris, Oslo, Lima, Kyiv} -> Paris, Oslo = 2/4 -> 0.5
    assert s["contamination"] == {"rate": 0.5, "chance": 0.5, "n_wrong": 2, "n_contaminated": 1}


def test_summary_without_unknowns_or_maps():
    rows = {t: [r for r in recs if r["label"] != "unknown"] for t, recs in world_rows().items()}
    for recs in rows.values():
        for r in recs:
            r["logprob"] = None  # not needed without unknown people
    s = M.summary(rows, 2)
    json.dumps(s, allow_nan=False)
    assert s["hallucination"] is None and s["contamination"] is None
    assert s["ckl"]["n_unknown"] == 0
    # unknown people all odd: no validation negatives -> a note, no numbers
    rows = world_rows()
    rows = {t: [r for r in recs if r["person"] != 6] for t, recs in rows.items()}
    s = M.summary(rows, 2)
    assert s["hallucination"] is None and "even person ids" in s["hallucination_note"]
