"""The paper's numbers (Allen-Zhu & Li, Part 3.1, arXiv 2309.14316), shown beside ours.

OOD QA accuracy on P_test, mean of the six attributes, GPT-2 small (124M) at 100k people.
"""

PAPER_OOD_MEAN = {
    "single": 9.7,
    "single+permute1": 4.4,
    "single+permute5": 70.0,
    "multi5": 41.0,
    "multi5+permute": 96.6,
    "mixed:single": 86.6,
    "celebrity": 86.8,  # minority's OOD accuracy with celebrity help (vs 4.4 without)
}
PAPER_OOD_ATTR = {"single": {"birth_date": 33.0}}


def paper_mean(cell) -> float | None:
    if cell.regime == "mixed":
        return PAPER_OOD_MEAN.get(f"mixed:{cell.world.augment}")
    if cell.world.minority:
        return PAPER_OOD_MEAN["celebrity"]
    return PAPER_OOD_MEAN.get(cell.world.augment)
