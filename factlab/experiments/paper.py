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
    """The paper's mean OOD accuracy for a cell like ``cell``; None for a world made from a
    user's fact file (the paper measured bioS worlds only)."""
    if getattr(cell.world, "facts", None):
        return None
    if cell.regime == "mixed":
        return PAPER_OOD_MEAN.get(f"mixed:{cell.world.augment}")
    if cell.world.minority:
        return PAPER_OOD_MEAN["celebrity"]
    return PAPER_OOD_MEAN.get(cell.world.augment)

# Probing (§5, Fig. 6–7). Q-probe accuracy (%) of the whole value on the end token of
# "<start> name <end>", GPT-2 small pretrained on multi5+permute; on bioS single it is near
# chance. The P-probe numbers are stated only qualitatively in the text.
PAPER_Q_PROBE = {
    "multi5+permute": {"birth_city": 96.1, "university": 72.6, "major": 94.9, "employer": 99.6,
                       "company_city": 99.7},
}
PAPER_Q_PROBE_NOTE = {"single": "near chance"}
PAPER_P_PROBE_NOTE = {
    "single": "near chance (≈2% for company) at every position before the attribute's own; "
              "high only right before the value",
    "multi5+permute": "≈100% from the first position on",
}


def paper_probe_key(cell) -> str | None:
    """The paper's dataset a cell's probe numbers compare with (BIO-pretrained cells only)."""
    if cell.regime == "mixed" or cell.world.minority:
        return None
    return cell.world.augment

# Part 3.2 (Allen-Zhu & Li, arXiv 2309.14402), inverse search: "virtually 0%" whatever the
# prompt when the bios name the person before the attributes; it works only when the
# knowledge is written in reverse order (the name after the attributes). Stated
# qualitatively here (no single number per dataset is quoted).
PAPER_INVERSE_NOTE = {
    "forward": "≈0% (virtually zero, any prompt)",
    "reverse": "works (well above 0)",
}


def paper_inverse_note(cell) -> str:
    from factlab.text.augment import parse_augment

    return PAPER_INVERSE_NOTE["reverse" if parse_augment(cell.world.augment).reverse
                              else "forward"]
