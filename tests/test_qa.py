"""QA pairs, held-out paraphrases, the leakage guard."""

import numpy as np
import pytest

from factlab.errors import FactlabError
from factlab.text.qa import check_no_leak, completion, prompt, training_qa
from factlab.world.people import ATTRIBUTES


def test_six_canonical_questions_with_canonical_answers(world_small):
    qa = world_small.qa([0, 1])
    assert len(qa) == 12
    t = world_small.people
    name = t.names[0]
    assert qa.question[0] == f"What is the birth date of {name}?"
    assert qa.question[5] == f"Where did {name} work?"
    for i in range(12):
        p, a = int(qa.person[i]), int(qa.attribute[i])
        assert qa.answer[i] == t.value(p, a)
        assert t.names[p] in qa.question[i]
    assert prompt("Q?") + completion("A") == "Q?\nAnswer: A"


def test_paraphrases_are_held_out(world_small):
    every = world_small.qa([0], paraphrase=True, all_paraphrases=True)
    canon = set(world_small.qa().question)
    assert every.heldout and len(every) >= 3 * len(ATTRIBUTES)
    assert not set(every.question) & canon
    assert (every.template >= 1).all()
    para = world_small.qa(paraphrase=True)  # one seeded phrasing per (person, attribute)
    assert len(para) == 6 * len(world_small.people)
    assert set(zip(para.attribute.tolist(), para.template.tolist())) == \
        set(zip(every.attribute.tolist(), every.template.tolist()))  # all phrasings used
    assert para.question[:6] == world_small.qa([0], paraphrase=True).question
    assert not set(para.question) & canon
    train = training_qa(world_small)
    assert not train.heldout and not set(para.question) & set(train.question)


def test_training_set_has_p_train_only(world_small):
    train = training_qa(world_small)
    assert set(np.unique(train.person).tolist()) == set(world_small.train_ids.tolist())
    assert len(train) == 6 * len(world_small.train_ids)


def test_leakage_fails_loudly(world_small):
    leak = np.concatenate([world_small.train_ids[:5], world_small.test_ids[:1]])
    with pytest.raises(FactlabError, match="leakage: .* 1 P_test"):
        training_qa(world_small, leak)
    with pytest.raises(FactlabError, match="leakage"):
        check_no_leak(world_small, world_small.test_ids)
    check_no_leak(world_small, world_small.train_ids)


def test_inverse_questions_give_every_value_and_ask_the_name(world_small):
    inv = world_small.inverse_qa([0, 3])
    t = world_small.people
    assert inv.attributes == ("name",) and list(inv.person) == [0, 3]
    for i, p in enumerate([0, 3]):
        assert inv.answer[i] == t.names[p]
        assert t.names[p] not in inv.question[i]
        for a in range(len(ATTRIBUTES)):
            assert t.value(p, a) in inv.question[i]
    assert inv.question[0].startswith(f"Who was born on {t.value(0, 'birth_date')} in "
                                      f"{t.value(0, 'birth_city')}, studied")
    # two people differ in their questions
    assert inv.question[0] != inv.question[1]


def test_training_qa_joins_forward_and_inverse_questions(world_small):
    fwd = training_qa(world_small)
    both = training_qa(world_small, kinds=("forward", "inverse"))
    n = len(world_small.train_ids)
    assert len(both) == len(fwd) + n
    assert both.attributes == tuple(ATTRIBUTES) + ("name",)
    assert both.question[:len(fwd)] == fwd.question
    inv = both.attribute[len(fwd):]
    assert (inv == len(ATTRIBUTES)).all()
    assert both.answer[len(fwd):] == [world_small.people.names[i]
                                      for i in world_small.train_ids]
    # the leakage guard holds for inverse questions too
    with pytest.raises(FactlabError, match="leakage"):
        training_qa(world_small, world_small.test_ids[:1], kinds=("inverse",))
    with pytest.raises(FactlabError, match="question kinds"):
        training_qa(world_small, kinds=("sideways",))


def test_inverse_search_needs_the_bios_attributes(tmp_path):
    from factlab.corpus import CorpusConfig, make_corpus

    f = tmp_path / "ships.csv"
    f.write_text("entity,attribute,value\nAldra,home port,Brem\nBovin,home port,Tarr\n")
    c = make_corpus(CorpusConfig(facts=str(f), unknown=0))
    with pytest.raises(FactlabError, match="six bioS attributes"):
        c.inverse_qa()
